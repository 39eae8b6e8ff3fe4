# Config helpers and input functions: no science here, only wiring.
import glob
import os
import shlex

RESULTS = config["results"]
DEMO_SHARDS = f"{RESULTS}/demo_shards"


def expand_shards(patterns, key="input"):
    """A config key's shards (.h5ad files or .zarr store directories: a glob or a list of paths/globs),
    expanded; empty when not set."""
    if not patterns:
        return []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise WorkflowError(f"config {key}: no file matches {pattern!r}")
        # .zarr stores are directories: a glob lists them as it lists files
        paths += matches
    return paths


def user_shards():
    """The configured shards, globs expanded; empty when the demo data is used."""
    return expand_shards(config.get("input"))


# With `convert: true` every step reads the shards rule convert_shards wrote, not the configured input.
CONVERT = bool(config.get("convert"))
CONVERTED_SHARDS = f"{RESULTS}/converted"


def input_shards(wildcards=None):
    """The configured input: the user's files, or the demo directory."""
    return user_shards() or [DEMO_SHARDS]


def input_shard_args(wildcards, input):
    """The --input arguments of the configured input: the user's files, or the demo directory's shards."""
    shards = user_shards()
    if shards:
        return " ".join(shlex.quote(p) for p in shards)
    return shlex.quote(f"{DEMO_SHARDS}/*.h5ad")


def shard_inputs(wildcards=None):
    """What the steps read: the converted shards (`convert: true`), else the configured input."""
    return [CONVERTED_SHARDS] if CONVERT else input_shards()


def shard_args(wildcards, input):
    if CONVERT:
        return shlex.quote(f"{CONVERTED_SHARDS}/shard_*.h5ad")
    return input_shard_args(wildcards, input)


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
            options += [flag, *map(str, value)] if value else []
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
    return " ".join(shlex.quote(o) for o in options + data_options())


# How every step that reads the shards reads them (null: the step's default).
DATA_KEYS = ("counts", "var_names", "gene_join", "obs_filter")


def data_options(for_convert=False):
    """--counts, --var-names, --gene-join, --obs-filter from the config's global keys, where set.

    With `convert: true` they go to the convert_shards job alone: the converted shards hold integer counts
    in X, the chosen genes as the var index and only the kept cells, so the later steps read them with
    the defaults (`--counts raw` would find no raw/X there).
    """
    if CONVERT and not for_convert:
        return []
    options = []
    for key in DATA_KEYS:
        if config.get(key) is not None:
            options += [f"--{key.replace('_', '-')}", str(config[key])]
    return options


def batch_columns(step=None):
    """The batch key as 'a,b' (a string or a list in the config): the step's own, else the global one."""
    key = (config.get(step) or {}).get("batch_key") if step else None
    key = key if key is not None else config.get("batch_key")
    return ",".join(key) if isinstance(key, list) else key


def batch_key_option(step=None):
    key = batch_columns(step)
    return f"--batch-key {shlex.quote(key)}" if key else ""


# hvg reuses mean-var's per-batch table when both group the cells alike; else it makes its own 2 passes.
HVG_USES_MEAN_VAR = batch_columns("hvg") == batch_columns()


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


def convert_obs_columns():
    """--obs-columns: none configured keeps every column all inputs have; a list keeps those and the columns
    later rules read (cell_type_key; convert adds the --batch-key columns itself)."""
    columns = list((config.get("convert_shards") or {}).get("obs_columns") or [])
    if not columns:
        return ""
    key = config.get("cell_type_key")
    columns += [key] if key and key not in columns else []
    return "--obs-columns " + " ".join(shlex.quote(c) for c in columns)
