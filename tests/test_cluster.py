"""The workflow on engines a user outgrows one machine with: a real one-node SLURM cluster started here
(DDP over 2 ranks per GPU job, a training job cancelled and resumed), and an S3 bucket (moto on
127.0.0.1) that the shards come from and the results go to. Both compare their export with a local
single-process run of the same data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml
from conftest import CLI, REPO
from object_store import AWS_ENV, MotoServer
from slurm_cluster import SlurmCluster, install_reason

pytestmark = pytest.mark.cluster

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SIMULATE = {"n_cells": 600, "n_genes": 200, "n_batches": 2, "n_cell_types": 3, "n_shards": 2}
#: the local reference and the S3 run: one process, the CPU
SMALL = {
    "simulate": SIMULATE, "accelerator": "cpu", "devices": 1, "cell_type_key": None,
    "hvg": {"n_top_genes": 50}, "pca": {"n_components": 5},
    "train_scvi": {"max_epochs": 2, "n_latent": 4, "n_hidden": 16, "batch_size": 128},
    "train_socam": {"max_epochs": 1, "batch_size": 128}, "report": {"sample_size": 300},
}
STRING_PARTITIONS = ds.partitioning(pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive")


def run_snakemake(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([SNAKEMAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=env or workflow_env())
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def workflow_env(**extra: str) -> dict[str, str]:
    """This interpreter's console scripts first on PATH: every job, local or on SLURM, runs them."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


def slurm_log(tmp_path: Path, rule: str) -> str:
    """What the job of ``rule`` printed on SLURM (its resources, its shell command), every attempt."""
    return "".join(p.read_text() for p in sorted((tmp_path / "slurm_logs" / f"rule_{rule}").rglob("*.log")))


def read_export(path: Path) -> pa.Table:
    table = ds.dataset(path, format="parquet", partitioning=STRING_PARTITIONS).to_table()
    return table.sort_by("cell_id")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo shards, as the workflow's simulate rule writes them for SIMULATE (the same cells)."""
    directory = tmp_path_factory.mktemp("cluster") / "shards"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SIMULATE.items()]
    subprocess.run([CLI, "simulate", "--output", str(directory), *options, "--quiet"], check=True, timeout=300)
    return directory


@pytest.fixture(scope="module")
def local_export(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The export of a local, single-process run on ``shards``."""
    root = tmp_path_factory.mktemp("local")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "input": f"{shards}/*.h5ad", "results": str(root / "results")}))
    run_snakemake("export", "--cores", "2", "--configfile", str(config))
    return read_export(root / "results" / "export" / "cells.parquet")


def test_s3_round_trip_reads_shards_from_and_writes_results_to_a_bucket(
    moto: MotoServer, shards: Path, local_export: pa.Table, tmp_path: Path
) -> None:
    s3 = moto.client()
    bucket = "cellarium-round-trip"
    s3.create_bucket(Bucket=bucket)
    for path in sorted(shards.glob("*.h5ad")):
        s3.upload_file(str(path), bucket, f"data/shards/{path.name}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    staged = tmp_path / "staged"
    started = time.monotonic()
    # Paths relative to the default storage prefix: the shards glob, and the results, are in the bucket.
    run_snakemake("export", "--cores", "2", "--configfile", str(config), *moto.snakemake_options(bucket, staged),
                  "--config", "input=data/shards/*.h5ad", "results=results", env=workflow_env(**AWS_ENV))
    elapsed = time.monotonic() - started

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, MaxKeys=1000)["Contents"]]
    assert "results/scvi/scvi.ckpt" in keys and "results/hvg/hvg.csv" in keys
    parts = [k for k in keys if k.startswith("results/export/cells.parquet/") and k.endswith(".parquet")]
    assert parts, keys
    downloaded = tmp_path / "downloaded"
    for key in parts:
        target = downloaded / key
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
    remote = read_export(downloaded / "results" / "export" / "cells.parquet")
    assert remote.num_rows == SIMULATE["n_cells"] and len(set(remote["cell_id"].to_pylist())) == SIMULATE["n_cells"]
    assert remote.schema.names == local_export.schema.names
    assert remote.equals(local_export), "the export from the bucket differs from the local run's"
    # every table went to the bucket: none is left behind in the local staging area
    assert "results/hvg/hvg.parquet" in keys and "results/statistics/mean_var.parquet" in keys
    assert not (REPO / "results" / "export").exists() and not list(staged.rglob("*.parquet"))
    print(f"S3 round trip: {elapsed:.0f} s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = install_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM test: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_slurm_profile_runs_the_workflow_with_ddp_and_resumes_a_cancelled_training_job(
    slurm: SlurmCluster, shards: Path, local_export: pa.Table, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    config = tmp_path / "config.yaml"
    # devices=2: each training and prediction job is one Lightning DDP run over 2 srun tasks. Enough
    # epochs that train_scvi is still running when its first epoch checkpoint appears.
    config.write_text(yaml.safe_dump({
        **SMALL, "input": f"{shards}/*.h5ad", "results": str(results), "accelerator": "auto", "devices": 2,
        "cell_type_key": "cell_type_ontology_term_id",
        "train_scvi": {**SMALL["train_scvi"], "max_epochs": 12},
    }))
    # No slurmdbd on this cluster: squeue answers the status queries (see workflow/profiles/README.md).
    # The srun tasks of a job meet at MASTER_ADDR; on a one-node cluster that is this machine.
    command = [SNAKEMAKE, "--profile", "workflow/profiles/slurm", "--configfile", str(config),
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
               "--slurm-logdir", str(tmp_path / "slurm_logs"), "--slurm-keep-successful-logs", "--jobs", "3",
               "--printshellcmds"]
    env = workflow_env(**slurm.env_overrides, MASTER_ADDR="127.0.0.1")
    started = time.monotonic()
    log = open(tmp_path / "snakemake.log", "w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        checkpoint = results / "scvi" / "scvi.ckpt.d" / "last.ckpt"
        deadline = time.monotonic() + 900
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), "train_scvi wrote no epoch checkpoint"
        job = slurm.job_of_rule("train_scvi")
        subprocess.run(["scancel", job], env=env, check=True, timeout=30)
        process.wait(timeout=1200)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
        log.close()
    elapsed = time.monotonic() - started
    output = (tmp_path / "snakemake.log").read_text()
    assert process.returncode == 0, output[-6000:]

    # the cancelled job was retried (the profile's `retries`) and resumed from its checkpoint
    assert f"SLURM-job '{job}' failed" in output and "CANCELLED" in output
    train_log = (results / "logs" / "train_scvi.log").read_text()
    assert "resuming from" in train_log
    # every training and prediction job ran 2 DDP ranks, each started by srun in the job
    for rule in ("train_scvi", "predict_scvi", "train_socam", "predict_socam"):
        text = (results / "logs" / f"{rule}.log").read_text()
        for rank in (0, 1):
            assert f"DDP rank {rank} of 2" in text, f"{rule}: rank {rank} missing\n{text[-3000:]}"
    for predictions in ("scvi", "socam"):
        assert len(list((results / predictions / "cells.parquet").glob("*.parquet"))) == 2  # a part per rank
    # statistics ran on the cpu partition, on the CPU; training and prediction on the gpu partition, under srun
    cpu_job = slurm_log(tmp_path, "mean_var")
    assert "slurm_partition=cpu" in cpu_job and "--accelerator cpu --devices 1" in cpu_job and "gpu=" not in cpu_job
    gpu_job = slurm_log(tmp_path, "predict_scvi")
    assert "slurm_partition=gpu" in gpu_job and "gpu=2" in gpu_job and "tasks_per_node=2" in gpu_job
    assert "srun --nodes=1 --ntasks-per-node=2" in gpu_job and "--accelerator auto --devices 2" in gpu_job
    # the export has every cell once: the same rows as the local single-process run
    export = read_export(results / "export" / "cells.parquet")
    assert export.num_rows == SIMULATE["n_cells"] and len(set(export["cell_id"].to_pylist())) == SIMULATE["n_cells"]
    assert export["cell_id"].to_pylist() == local_export["cell_id"].to_pylist()
    assert export["batch"].to_pylist() == local_export["batch"].to_pylist()
    assert {"scvi_latent", "pca", "cell_type"} <= set(export.schema.names)
    print(f"SLURM: cluster set up in {slurm.setup_s:.1f} s, workflow {elapsed:.0f} s")
