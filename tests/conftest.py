"""Shared fixtures: the real data in ../shared/data, split into shards; CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLARIUM_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
PBMC_MULTIBATCH = SHARED_DATA / "pbmc_multibatch_15493x7152_raw.h5ad"
PBMC4K = SHARED_DATA / "pbmc4k_soupx_2170x33694_raw.h5ad"
MOUSE_BRAIN = SHARED_DATA / "mouse_brain_10x_10k_subset_10000x1000_raw.h5ad"
CLI = str(Path(sys.executable).with_name("cellarium-steps"))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found: {path} (the shared data directory is not mounted here)")
    return path


def split_into_shards(adata: ad.AnnData, directory: Path, n_shards: int) -> list[str]:
    """Write contiguous row ranges as .h5ad shards, as a user's sharded dataset would be."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, adata.n_obs, n_shards + 1).astype(int)
    paths = []
    for i in range(n_shards):
        path = directory / f"shard_{i:03d}.h5ad"
        adata[bounds[i] : bounds[i + 1]].copy().write_h5ad(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def pbmc_multibatch() -> ad.AnnData:
    return ad.read_h5ad(require(PBMC_MULTIBATCH))


@pytest.fixture(scope="session")
def pbmc_shards(pbmc_multibatch: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The merged PBMC file as 3 shards of unequal batch content."""
    return split_into_shards(pbmc_multibatch, tmp_path_factory.mktemp("pbmc_shards"), 3)


def run_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real console script, as a user or a Snakemake rule would."""
    result = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cellarium-steps {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """An S3 server (moto) on 127.0.0.1, started once; each test makes its own bucket."""
    from object_store import MotoServer  # imported only by the tests that ask for it

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()
