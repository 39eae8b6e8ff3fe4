"""The `cellarium-steps` command: one subcommand per step, each a thin wrapper over the runner."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from cellarium_steps import __version__
from cellarium_steps.steps import hvg, mean_var, pca, predict, simulate, tdigest, train_scvi
from cellarium_steps.steps.common import configure_logging, parse_step_args, run_guarded

STEPS: tuple[ModuleType, ...] = (simulate, mean_var, tdigest, hvg, pca, train_scvi, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellarium-steps",
        description="Streaming single-cell RNA-seq steps over .h5ad shards. "
        "Every step takes --input, --output, --batch-key, --batch-size, --num-workers, --devices, --seed and --config.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    for step in STEPS:
        sub = subparsers.add_parser(
            step.NAME, help=step.HELP, description=step.HELP, epilog=getattr(step, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        step.add_arguments(sub)
        sub.set_defaults(module=step)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the step name first, then the step's own options on top of its --config.
    step_name = parser.parse_known_args(argv)[0].step
    step = next(s for s in STEPS if s.NAME == step_name)
    subparser = parser._subparsers._group_actions[0].choices[step_name]  # type: ignore[union-attr]

    def run() -> None:
        args = parse_step_args(subparser, argv[argv.index(step_name) + 1 :], required=getattr(step, "REQUIRED", ("input", "output")))
        configure_logging(getattr(args, "quiet", False))
        step.run(args)

    return run_guarded(step_name, run)


if __name__ == "__main__":
    sys.exit(main())
