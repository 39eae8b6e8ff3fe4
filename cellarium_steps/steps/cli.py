"""The `cellarium-steps` command: one subcommand per step, each a thin wrapper over the runner."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

from cellarium_steps import __version__
from cellarium_steps.steps.common import configure_logging, parse_step_args, run_guarded

# Step name -> module. Only the step being run is imported, which keeps start-up (paid by every
# Snakemake job) to what that step needs.
STEP_MODULES: dict[str, str] = {
    "simulate": "cellarium_steps.steps.simulate",
    "convert": "cellarium_steps.steps.convert",
    "mean-var": "cellarium_steps.steps.mean_var",
    "tdigest": "cellarium_steps.steps.tdigest",
    "hvg": "cellarium_steps.steps.hvg",
    "pca": "cellarium_steps.steps.pca",
    "train-scvi": "cellarium_steps.steps.train_scvi",
    "train-socam": "cellarium_steps.steps.train_socam",
    "train-logreg": "cellarium_steps.steps.train_logreg",
    "train-geneformer": "cellarium_steps.steps.train_geneformer",
    "train-gpt": "cellarium_steps.steps.train_gpt",
    "predict": "cellarium_steps.steps.predict",
    "export": "cellarium_steps.steps.export",
    "report": "cellarium_steps.steps.report",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, the other steps are listed but not imported."""
    parser = argparse.ArgumentParser(
        prog="cellarium-steps",
        description="Streaming single-cell RNA-seq steps over .h5ad shards. Every step takes --input, --output, "
        "--batch-key, --batch-size, --num-workers, --devices, --seed and --config.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    for name, module_name in STEP_MODULES.items():
        if only is not None and name != only:
            subparsers.add_parser(name)
            continue
        step = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name, help=step.HELP, description=step.HELP, epilog=getattr(step, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        step.add_arguments(sub)
    return parser


def configure_allocator() -> None:
    """glibc malloc for streaming batches: arrays of 8 MiB and more get their own mappings, returned
    to the OS when freed; the heap keeps up to 64 MiB of free memory at its top.

    glibc's default raises its mmap threshold as large arrays are freed, so ever larger batch
    arrays land on a fragmenting heap: HVG's pass over 1,000,000 cells then peaked 43% higher than
    over 200,000 (945 vs 661 MB). Fixing the threshold alone keeps the peak flat (588 vs 579 MB) but
    also fixes the trim threshold at 128 KiB, so the heap gives back and faults in its top pages
    batch after batch: reading scVI batches took 19 us a cell instead of 14.5. A 64 MiB trim
    threshold keeps both: 15.5 us a cell, 594 vs 572 MB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_allocator()
    step_name = next((a for a in argv if not a.startswith("-")), None)
    if step_name not in STEP_MODULES:
        build_parser().parse_args(argv)  # prints help, the version, or the error, and exits
        return 2
    step: ModuleType = importlib.import_module(STEP_MODULES[step_name])
    parser = build_parser(only=step_name)
    subparser = parser._subparsers._group_actions[0].choices[step_name]  # type: ignore[union-attr]

    def run() -> None:
        required = getattr(step, "REQUIRED", ("input", "output"))
        args = parse_step_args(subparser, argv[argv.index(step_name) + 1 :], required=required)
        configure_logging(getattr(args, "quiet", False))
        step.run(args)

    return run_guarded(step_name, run)


def console_main() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    Tearing down the modules after torch is imported takes 0.6-0.9 s (its operator libraries
    deregister one by one, then the garbage collector walks every module's objects), about as long
    as a statistics pass over 100,000 cells, and every Snakemake job pays it. By then each output has
    been written, closed and renamed into place, so only the flushes are left. Where exit handlers
    still have work (a process group, child processes, other threads, torch.compile's worker
    pool), the normal exit runs instead.
    """
    code = main()
    if _only_this_thread_and_process_left():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _only_this_thread_and_process_left() -> bool:
    if "torch._inductor" in sys.modules:  # its atexit handler shuts down the compile workers
        return False
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return False
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not others and not multiprocessing.active_children()


if __name__ == "__main__":
    console_main()
