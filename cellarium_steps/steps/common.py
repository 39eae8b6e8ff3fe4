"""What every step shares: common options, --config files, provenance, clean failure."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import inspect
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cellarium_steps import __version__
from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.options import DataOptions
from cellarium_steps.data.yaml_config import read_yaml_config

logger = logging.getLogger("cellarium_steps")

_PROVENANCE_PACKAGES = ("torch", "lightning", "pyro-ppl", "anndata", "numpy", "scipy", "pandas", "pyarrow", "crick")


def add_common_arguments(parser: argparse.ArgumentParser, *, batch_size: int = 10_000) -> None:
    """The options every step takes, with the same names and meanings."""
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--input", nargs="+", metavar="H5AD",
        help="the shards (.h5ad files or .zarr stores): paths, or a quoted glob such as 'shards/*.h5ad' (required)",
    )
    group.add_argument("--output", metavar="PATH", help="path of the step's main output file (required)")
    group.add_argument(
        "--batch-key", metavar="COLUMN[,COLUMN...]", default=None,
        help="obs column with each cell's batch, or several (dataset_id,assay,donor_id): the batch is their "
        "combination, named a|b|c; statistics are kept per batch (default: no batches)",
    )
    add_data_arguments(group)
    group.add_argument(
        "--batch-size", type=int, default=batch_size, metavar="N",
        help=f"cells per batch read from the shards (default: {batch_size}); memory grows with it",
    )
    group.add_argument(
        "--num-workers", type=int, default=0, metavar="N",
        help="DataLoader worker processes reading shards in parallel per device (default: 0, read in the main process)",
    )
    group.add_argument(
        "--devices", default="1", metavar="N",
        help="devices (processes) to run on; more than 1 runs Lightning DDP (default: 1)",
    )
    group.add_argument(
        "--num-nodes", type=int, default=1, metavar="N",
        help="machines the DDP run spans, each running --devices processes (default: 1); more than 1 needs a "
        "launcher that starts every process, such as SLURM's srun --ntasks-per-node",
    )
    group.add_argument(
        "--accelerator", default="auto", choices=("auto", "cpu", "gpu"),
        help="where to compute: cpu, gpu, or auto (gpu if CUDA is available; default)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same outputs (default: 0)")
    group.add_argument(
        "--config", metavar="YAML",
        help="a YAML file whose keys are these options' long names (dashes or underscores); "
        "options given on the command line win",
    )
    group.add_argument("--quiet", action="store_true", help="log warnings and errors only")


def add_data_arguments(group: argparse._ArgumentGroup) -> None:
    """Where the counts are, which names are the genes, how shards' genes join, which cells: DataOptions."""
    group.add_argument(
        "--counts", metavar="auto|X|raw|layers/NAME", default=None,
        help="the matrix of raw integer counts: X, raw (raw/X, genes from raw/var), layers/NAME, or auto (X when "
        "it holds integer counts, else raw/X; default, or for predict the matrix the model was trained on)",
    )
    group.add_argument(
        "--var-names", metavar="index|COLUMN", default=None,
        help="what names the genes: the var index (default) or a var column such as feature_name or gene_ids",
    )
    group.add_argument(
        "--gene-join", choices=("same", "inner", "outer"), default=None,
        help="shards' genes, aligned by name: the same set in any order (default), the genes all shards have "
        "(inner), or all genes, zero where a shard lacks one and left out of its per-gene statistics (outer)",
    )
    group.add_argument(
        "--obs-filter", metavar="EXPR", default=None,
        help="read only the cells this pandas query over obs keeps; n_genes is each cell's detected genes, "
        "e.g. 'is_primary_data == True and n_genes >= 300' (default: every cell)",
    )


def add_missing_genes_arguments(group: argparse._ArgumentGroup) -> None:
    """The options of steps that read a trained model's genes from new data (predict, train-scvi --reference)."""
    group.add_argument(
        "--missing-genes", choices=("error", "zero"), default="error",
        help="a gene of the model that the shards lack: error (default) or zero (read as zeros, with a warning "
        "that counts and names them; refused above --max-missing-genes-fraction)",
    )
    group.add_argument(
        "--max-missing-genes-fraction", type=float, default=0.1, metavar="F",
        help="with --missing-genes zero, the largest fraction of the model's genes that may be missing (default: 0.1)",
    )


def parse_step_args(parser: argparse.ArgumentParser, argv: Sequence[str], required: Sequence[str] = ("input", "output")) -> argparse.Namespace:
    """Parse argv on top of --config defaults; unknown config keys and missing options are errors."""
    pre, _ = parser.parse_known_args(argv)
    config_path = getattr(pre, "config", None)
    if config_path:
        parser.set_defaults(**load_config(config_path, parser))
    args = parser.parse_args(argv)
    missing = [name for name in required if getattr(args, name, None) in (None, [], "")]
    if missing:
        parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if isinstance(getattr(args, "input", None), str):
        args.input = [args.input]
    if hasattr(args, "devices"):
        args.devices = _parse_devices(args.devices)
    for name in ("batch_size", "n_cells", "n_genes", "n_batches", "n_shards", "n_cell_types"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "num_workers", 0) < 0:
        parser.error("--num-workers must be 0 or more")
    if getattr(args, "num_nodes", 1) < 1:
        parser.error("--num-nodes must be at least 1")
    return args


def _parse_devices(value: Any) -> int | str:
    text = str(value)
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text == "auto":
        return text
    raise ConfigError(f"--devices: expected a positive number or 'auto', got {value!r}")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config and check every key against the step's options."""
    raw = read_yaml_config(path, "--config")
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path}: expected a mapping of option names to values")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            suggestions = ", ".join(sorted(d.replace("_", "-") for d in known))
            raise ConfigError(f"--config: {path}: unknown key {key!r} (known: {suggestions})")
        action = known[dest]
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--config: {path}: key {key!r}: cannot read {value!r} as {action.type.__name__}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config: {path}: key {key!r}: {value!r} is not one of {list(action.choices)}")
        values[dest] = value
    return values


def call_pipeline(fn: Callable[..., Any], args: argparse.Namespace, **overrides: Any) -> Any:
    """``fn(**options)``: each keyword argument ``fn`` takes, from ``overrides`` or else from the parsed
    option of the same name (``inputs`` from ``--input``). Pipelines never see the Namespace."""
    options = vars(args)
    parameters = inspect.signature(fn).parameters
    unknown = sorted(set(overrides) - set(parameters))
    if unknown:
        raise TypeError(f"{fn.__name__} takes no {unknown}")
    kwargs: dict[str, Any] = {}
    for name, parameter in parameters.items():
        option = "input" if name == "inputs" else name
        if name == "data_options" and name not in overrides:
            kwargs[name] = DataOptions(**{f.name: options.get(f.name) for f in dataclasses.fields(DataOptions)})
        elif name in overrides:
            kwargs[name] = overrides[name]
        elif option in options:
            kwargs[name] = options[option]
        elif parameter.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__} needs {name!r}, which is neither an option nor given")
    return fn(**kwargs)


def provenance(step: str, args: argparse.Namespace) -> dict[str, Any]:
    """Versions and configuration that made an output, stored beside or inside it."""
    versions = {"cellarium-steps": __version__, "python": platform.python_version()}
    for package in _PROVENANCE_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    config = {k: v for k, v in vars(args).items() if k not in ("func", "quiet")}
    return {
        "step": step,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": config,
        "versions": versions,
    }


def configure_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(step: str, fn: Callable[[], None]) -> int:
    """Run a step; bad input ends it with one line naming the file and field, and exit code 2."""
    try:
        fn()
    except InputError as e:
        print(f"cellarium-steps {step}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellarium-steps {step}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(error: Exception) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in a traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


# -- the options of the label-trained steps (train-socam, train-logreg) ------------------------------------


def add_label_training_arguments(parser: argparse.ArgumentParser, *, step: str, w_prior_scale: float,
                                 learning_rate: float = 1e-2) -> argparse._ArgumentGroup:
    # imported here, not at the top: every step imports this module, and the label pipeline loads Lightning
    from cellarium_steps.pipelines.labels import DEFAULT_MAX_EPOCHS_CAP, DEFAULT_TRAINING_STEPS

    add_common_arguments(parser, batch_size=1024)
    group = parser.add_argument_group(f"{step} options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to use: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output; the "
        "highly variable ones are used) or a text file with one gene per line (default: all genes)",
    )
    group.add_argument(
        "--cell-type-key", default="cell_type_ontology_term_id", metavar="COLUMN",
        help="obs column with each cell's Cell Ontology id; missing or 'unknown' cells are not trained on "
        "(default: cell_type_ontology_term_id)",
    )
    group.add_argument("--max-epochs", type=int, default=None, metavar="N",
                       help=f"passes over the data (default: enough for about {DEFAULT_TRAINING_STEPS} optimizer "
                       f"steps, at most {DEFAULT_MAX_EPOCHS_CAP} epochs; 1 on large data)")
    group.add_argument("--learning-rate", type=float, default=learning_rate, metavar="LR",
                       help=f"Adam learning rate (default: {learning_rate:g})")
    group.add_argument("--target-count", type=float, default=1e4, metavar="N",
                       help="each cell's counts are scaled to this total before log1p (default: 1e4)")
    features = group.add_mutually_exclusive_group()
    features.add_argument("--pca", metavar="PATH",
                          help="train on the cells' principal components instead of genes: the pca step's --output "
                          "(its normalisation and genes come with it)")
    features.add_argument("--scvi", metavar="CKPT",
                          help="train on the cells' scVI latent means instead of genes: a train-scvi checkpoint "
                          "(batches coded as it coded them; --batch-key defaults to its)")
    group.add_argument("--w-prior-scale", type=float, default=w_prior_scale, metavar="B",
                       help=f"scale of the Laplace prior on the weights; smaller is sparser (default: {w_prior_scale:g})")
    return group


def label_training_options(step: str, args: argparse.Namespace) -> Any:
    """train-socam's and train-logreg's options as a ``pipelines.labels.LabelTrainingOptions``."""
    from cellarium_steps.pipelines.labels import LabelTrainingOptions

    return call_pipeline(LabelTrainingOptions, args, provenance=provenance(step, args))
