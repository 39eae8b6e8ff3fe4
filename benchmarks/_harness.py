"""Shared helpers for the benchmarks in this folder: cached demo shards, timing, tables.

Not a benchmark itself; see ``bench_*.py``. Reproduce e.g. the mean-var benchmark with::

    .venv/bin/python benchmarks/bench_mean_var.py --cells 200000 --also-cells 1000000

Timings and memory are of whole subprocesses (a fresh interpreter per tool), so imports,
file reading and writing are included on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
OUT_DIR = BENCH_DIR / "out"

SOURCE_FILE = "pbmc_multibatch_15493x7152_raw.h5ad"
OBS_COLUMNS = ("batch", "source", "cell_type_ontology_term_id", "cell_type")
SHARED_DATA_ENV = "CELLARIUM_SHARED_DATA"

# Reading one process's PSS walks its page tables (about 12 ms for a 600 MB process, holding its
# memory-map lock): every 50 ms, that took a fifth of a core from the measured command, on 2 cores
# mostly from whichever side runs two threads. The single largest process's peak comes from the
# kernel (wait4) whatever the interval.
POLL_SECONDS = 0.5
_STDERR_TAIL_CHARS = 4000


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; ``how`` says how, e.g. ``killed by signal 9``."""

    def __init__(self, message: str, returncode: int, how: str):
        super().__init__(message)
        self.returncode = returncode
        self.how = how


def shared_data_dir() -> Path:
    """``$CELLARIUM_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def source_h5ad() -> Path:
    """The real PBMC file the benchmark shards are resampled from; exits with a clear message if absent."""
    path = shared_data_dir() / SOURCE_FILE
    if not path.is_file():
        sys.exit(
            f"benchmark data not found: {path}\n"
            f"Put {SOURCE_FILE} in <repo>/../shared/data/ or point ${SHARED_DATA_ENV} at the folder holding it."
        )
    return path


def ensure_resampled_shards(n_cells: int, n_shards: int = 10, seed: int = 0) -> list[str]:
    """``n_shards`` shards of ``n_cells`` cells bootstrapped (binomially thinned) from the real PBMC file.

    Built once under ``benchmarks/out/shards_{n_cells}/`` and reused while every shard exists and
    the recorded parameters (shard count, seed, source file) match; otherwise rebuilt.
    """
    from cellarium_steps.data.simulate import resample_shards

    source = source_h5ad()
    out_dir = OUT_DIR / f"shards_{n_cells}"
    width = max(3, len(str(n_shards - 1)))
    expected = [out_dir / f"shard_{s:0{width}d}.h5ad" for s in range(n_shards)]
    params = {
        "source": SOURCE_FILE,
        "source_bytes": source.stat().st_size,
        "n_cells": n_cells,
        "n_shards": n_shards,
        "seed": seed,
        "obs_columns": list(OBS_COLUMNS),
    }
    manifest = out_dir / "manifest.json"
    if all(p.is_file() for p in expected) and manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == params:
                return [str(p) for p in expected]
        except (OSError, ValueError):
            pass
    if out_dir.is_dir():
        for stale in out_dir.glob("shard_*.h5ad"):
            stale.unlink()
        manifest.unlink(missing_ok=True)
    print(f"[harness] resampling {n_cells:,} cells into {n_shards} shards under {out_dir} ...", file=sys.stderr)
    start = time.perf_counter()
    paths = resample_shards(
        str(source), str(out_dir), n_cells=n_cells, n_shards=n_shards, seed=seed, obs_columns=OBS_COLUMNS
    )
    manifest.write_text(json.dumps(params, indent=2) + "\n")
    print(f"[harness] shards written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return paths


def _tree_rss_bytes(proc) -> int:
    """Proportional set size (PSS) summed over a process and its living descendants.

    PSS splits pages shared by forked processes (DataLoader workers, DDP ranks) between them, so
    the sum is the tree's real footprint; plain RSS would count the shared torch libraries once
    per process. Falls back to RSS where PSS is unavailable; vanished processes count 0.
    """
    import psutil

    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            info = member.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def _tail(path: str, n_chars: int = _STDERR_TAIL_CHARS) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n_chars))
        return f.read().decode(errors="replace")


def measure(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> dict:
    """Run ``cmd``; return its wall time and the peak RSS of its whole process tree.

    The tree (the command and every descendant, e.g. DataLoader workers and DDP ranks) is
    sampled with psutil every ``POLL_SECONDS`` and the PSS of its members summed; ``peak_rss_mb`` is the
    largest sum seen. ``max_single_rss_mb`` is the kernel's high-water mark of the single largest process
    (from ``wait4``), which also catches spikes shorter than a sampling interval.
    Raises ``CommandFailed`` (a ``RuntimeError``) with the tail of its stderr if the command exits non-zero.
    """
    import psutil

    cmd = [str(c) for c in cmd]
    with tempfile.NamedTemporaryFile(prefix="bench_stderr_", suffix=".log", delete=False) as err_file:
        err_path = err_file.name
    try:
        with open(err_path, "wb") as err:
            start = time.perf_counter()
            popen = subprocess.Popen(cmd, env=None if env is None else dict(env), stdout=subprocess.DEVNULL, stderr=err)
            done = threading.Event()
            result: dict = {}

            def reap() -> None:
                # Blocking wait4 in a thread: the end time is exact, not rounded up to the next poll.
                _, status, usage = os.wait4(popen.pid, 0)
                result["end"] = time.perf_counter()
                result["status"] = status
                result["usage"] = usage
                done.set()

            proc = psutil.Process(popen.pid)  # before the reaper can reap it
            reaper = threading.Thread(target=reap, daemon=True)
            reaper.start()
            peak = 0
            while not done.is_set():
                peak = max(peak, _tree_rss_bytes(proc))
                done.wait(POLL_SECONDS)
            reaper.join()
        returncode = os.waitstatus_to_exitcode(result["status"])
        popen.returncode = returncode  # reaped above; keep Popen from waiting again
        wall = result["end"] - start
        if returncode != 0:
            how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
            raise CommandFailed(
                f"command failed ({how}) after {wall:.1f} s: {' '.join(cmd)}\n--- stderr tail ---\n{_tail(err_path)}",
                returncode,
                how,
            )
        # ru_maxrss is in KiB on Linux.
        return {
            "cmd": cmd,
            "returncode": returncode,
            "wall_s": wall,
            "peak_rss_mb": peak / 2**20,
            "max_single_rss_mb": result["usage"].ru_maxrss / 1024,
        }
    finally:
        os.unlink(err_path)


def warm_up(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Run ``cmd`` once, untimed, so that the timed run reads its inputs from the page cache too.

    Nothing is dropped from the cache (no root needed); instead both sides start equally warm.
    """
    measure(cmd, env)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def print_table(rows: list[dict]) -> str:
    """Print ``rows`` as a fixed-width text table, then as markdown; return the text table.

    Columns are the union of the rows' keys in first-seen order; numbers are right-aligned.
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) or row.get(c) is None for row in rows)
        for c in columns
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    text_lines = [line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    text = "\n".join(text_lines)
    md_lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
        *("| " + " | ".join(r) + " |" for r in cells),
    ]
    markdown = "\n".join(md_lines)
    print(text)
    print()
    print(markdown)
    return text


def cellarium_steps_exe() -> str:
    """The console script installed beside this interpreter (no symlink resolution: venvs link python)."""
    exe = Path(sys.executable).parent / "cellarium-steps"
    if not exe.is_file():
        sys.exit(f"{exe} not found: install the package into this environment (pip install -e .)")
    return str(exe)


def checkpoint_latent(checkpoint: str, adata, batch_key: str) -> np.ndarray:
    """A scVI checkpoint's latent means of an in-memory AnnData's cells (its genes as the checkpoint's),
    each cell's ``batch_key`` coded as the checkpoint codes its batches; 1,024 cells at a time."""
    import torch

    from cellarium_steps.runner import CellariumModule

    module = CellariumModule.from_checkpoint(checkpoint)
    categories = [str(c) for c in module.recipe["data"]["batch_categories"]]
    batch_index_n = torch.tensor([categories.index(b) for b in adata.obs[batch_key].astype(str)])
    parts = []
    with torch.no_grad():
        for start in range(0, adata.n_obs, 1024):
            rows = slice(start, min(start + 1024, adata.n_obs))
            x_ng = torch.tensor(adata.X[rows].toarray(), dtype=torch.float32)
            parts.append(module.model.predict(x_ng, adata.var_names.values, batch_index_n[rows])["x_ng"].numpy())
    return np.concatenate(parts)


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest |a - b| / max(|a|, |b|) over entries; 0 where both are 0 and where both are NaN."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape or np.any(np.isnan(ours) != np.isnan(ref)):
        return float("inf")
    both_nan = np.isnan(ours) & np.isnan(ref)
    scale = np.maximum(np.abs(ours), np.abs(ref))
    diff = np.abs(ours - ref)
    rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    return float(np.max(rel[~both_nan], initial=0.0))


def print_checks(checks: Mapping[str, tuple[float, bool]], full_command: str) -> int:
    """Print each acceptance check (``ok`` or ``FAIL``, its value) and the full benchmark's command; 1 if one failed."""
    failed = False
    for name, (value, ok) in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.4g}")
        failed |= not ok
    print(f"\nfull benchmark: {full_command}")
    return 1 if failed else 0


def run_json_worker(script: str, name: str, spec: Mapping, label: str) -> dict:
    """Run ``script --worker NAME --spec JSON`` in a fresh interpreter (``spec["threads"]`` OpenMP threads)
    and return its result, the last stdout line as JSON; ``label`` is printed to stderr first."""
    print(label, file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, script, "--worker", name, "--spec", json.dumps(spec)],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options by which a benchmark runs one of its workers (see :func:`run_json_worker`)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


def run_if_worker(args: argparse.Namespace, workers: Mapping) -> bool:
    """With ``--worker NAME``: run ``workers[NAME](spec)``, print its result as JSON, and return True."""
    if not args.worker:
        return False
    print(json.dumps(workers[args.worker](json.loads(args.spec))))
    return True
