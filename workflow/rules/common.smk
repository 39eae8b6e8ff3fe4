# Config helpers and input functions: no science here, only wiring.
import glob
import os
import shlex

RESULTS = config["results"]
DEMO_SHARDS = f"{RESULTS}/demo_shards"


def expand_shards(patterns, key="input"):
    """A config key's shards (a glob or a list of paths/globs), expanded; empty when not set."""
    if not patterns:
        return []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise WorkflowError(f"config {key}: no file matches {pattern!r}")
        paths += matches
    return paths


def user_shards():
    """The configured shards, globs expanded; empty when the demo data is used."""
    return expand_shards(config.get("input"))


def shard_inputs(wildcards=None):
    return user_shards() or [DEMO_SHARDS]


def shard_args(wildcards, input):
    """The --input arguments: the user's files, or the demo directory's shards."""
    shards = user_shards()
    if shards:
        return " ".join(shlex.quote(p) for p in shards)
    return shlex.quote(f"{DEMO_SHARDS}/*.h5ad")


def step_options(step, exclude=(), section=None):
    """A step's config section (or ``section``) as long options, e.g. {batch_size: 10} -> --batch-size 10."""
    options = []
    for key, value in (
        section if section is not None else config.get(step) or {}
    ).items():
        if key in exclude or value is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            options += [flag] if value else []
        elif isinstance(value, list):
            options += [flag, *map(str, value)]
        else:
            options += [flag, str(value)]
    return " ".join(shlex.quote(o) for o in options)


def common_options():
    options = [
        "--seed",
        str(config["seed"]),
        "--accelerator",
        config["accelerator"],
        "--devices",
        str(config["devices"]),
    ]
    return " ".join(shlex.quote(o) for o in options)


def batch_key_option():
    key = config.get("batch_key")
    return f"--batch-key {shlex.quote(key)}" if key else ""


# SOCAM (train_socam, predict_socam) runs when the shards have cell type labels.
SOCAM = bool(config.get("cell_type_key"))


def cell_type_key_option():
    key = config.get("cell_type_key")
    return f"--cell-type-key {shlex.quote(key)}" if key else ""


def export_dataset():
    """The export's `dataset` partition: config export.dataset, else the results directory's name."""
    name = (config.get("export") or {}).get("dataset")
    return (
        name
        or os.path.basename(os.path.normpath(os.path.abspath(RESULTS)))
        or "default"
    )
