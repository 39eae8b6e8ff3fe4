# Config helpers and input functions: no science here, only wiring.
import fnmatch
import functools
import glob
import os
import posixpath
import re
import shlex

from snakemake.settings.types import DeploymentMethod

RESULTS = config["results"]
DEMO_SHARDS = f"{RESULTS}/demo_shards"


def expand_shards(patterns, key="input"):
    """A config key's shards (.h5ad files or .zarr store directories: a glob or a list of paths/globs),
    globs expanded (in the object store when the path is one); empty when not set."""
    if not patterns:
        return []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths = []
    for pattern in patterns:
        if not glob.has_magic(pattern):
            matches = [pattern]
        elif "://" in pattern or workflow.storage_settings.default_storage_provider:
            matches = storage_glob(pattern)
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise WorkflowError(f"config {key}: no file matches {pattern!r}")
        # .zarr stores are directories: a glob lists them as it lists files
        paths += matches
    return paths


@functools.cache  # every rule asks; a bucket is listed once
def user_shards():
    """The configured shards, globs expanded; empty when the demo data is used."""
    return expand_shards(config.get("input"))


def storage_glob(pattern):
    """A glob over a Snakemake storage provider: the `s3://...` (or other provider's) URL, or a path under
    the default storage prefix (`--default-storage-prefix`), which is then returned as a path again.
    """
    prefix = ""
    query = pattern
    if "://" not in pattern:
        prefix = posixpath.join(workflow.storage_settings.default_storage_prefix, "")
        query = posixpath.join(prefix, pattern)
    constant = re.split(r"[*?\[]", query, maxsplit=1)[0]
    listed = storage(constant).flags["storage_object"]
    if hasattr(listed, "s3bucket"):
        # snakemake-storage-plugin-s3 0.3.6's list_candidate_matches() compares the bucket name with the
        # whole s3:// URL and always fails; list the bucket under the constant prefix instead.
        keys = (
            o.key
            for o in listed.s3bucket().objects.filter(Prefix=listed.key.rstrip("."))
        )
        urls = [f"s3://{listed.bucket}/{key}" for key in keys]
    else:
        urls = list(listed.list_candidate_matches())
    # glob's meaning: a wildcard stays within one path segment
    parts = query.split("/")
    matches = sorted(
        url
        for url in urls
        if len(url.split("/")) == len(parts)
        and all(map(fnmatch.fnmatchcase, url.split("/"), parts))
    )
    if prefix:
        return [url[len(prefix) :] for url in matches]
    return [storage(url) for url in matches]


def demo_shards():
    """The files `cellarium-steps simulate` writes: shard_000.h5ad, ... (3 digits at least)."""
    n_shards = (config.get("simulate") or {}).get("n_shards", 4)
    width = max(3, len(str(n_shards - 1)))
    return [f"{DEMO_SHARDS}/shard_{i:0{width}d}.h5ad" for i in range(n_shards)]


# With `convert: true` every step reads the shards rule convert_shards wrote, not the configured input.
CONVERT = bool(config.get("convert"))
CONVERTED_SHARDS = f"{RESULTS}/converted"


def input_shards(wildcards=None):
    """The configured input as `input:` files (so that storage plugins stage them): the user's, else the
    demo's."""
    return user_shards() or demo_shards()


def input_shard_args(wildcards, input):
    """The --input arguments of a rule's `shards` input (the configured input, or the query's): their local
    paths, where a storage plugin staged them."""
    return " ".join(shlex.quote(p) for p in input.shards)


def shard_inputs(wildcards=None):
    """What the steps read: the converted shards (`convert: true`), else the configured input."""
    return [CONVERTED_SHARDS] if CONVERT else input_shards()


def shard_args(wildcards, input):
    """The --input arguments of what the steps read."""
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


# `devices` GPUs (processes) on each of `num_nodes` machines: the resources of every rule that trains or
# predicts (as Snakemake's SLURM plugin reads them; `gpu` is also the local scheduler's and Kubernetes'
# GPU count), and the step's --devices/--num-nodes.
DEVICES = config["devices"]
NUM_NODES = config.get("num_nodes", 1)


# In a container there is no srun: Lightning starts a one-machine run's processes itself.
CONTAINERS = (
    DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method
)
if CONTAINERS and NUM_NODES > 1:
    raise WorkflowError(
        "num_nodes > 1 needs srun to start the processes on every machine, which the container has not: "
        "run the SLURM profile without containers (from the environment with cellarium-steps)"
    )


def gpu_resources():
    """The resources of a rule that runs Lightning over `devices` x `num_nodes` processes."""
    resources = {"nodes": NUM_NODES}
    if config["accelerator"] != "cpu":  # a job forced onto the CPU asks for no GPU
        if NUM_NODES == 1:
            resources["gpu"] = DEVICES
        else:  # --gpus counts the whole job; --gres counts each node's
            resources["gres"] = f"gpu:{DEVICES}"
    if DEVICES * NUM_NODES > 1:
        # `mpi`: the SLURM plugin then starts the job without its one-task `srun -n1` and asks for the
        # tasks below; the rule's `launch` starts them (one Lightning rank each). Other executors ignore it.
        resources["mpi"] = "srun"
        if DEVICES > 1:
            resources["tasks_per_node"] = DEVICES
        else:  # the plugin refuses tasks_per_node=1 for a multi-task job
            resources.update(tasks=NUM_NODES, tasks_per_gpu=1)
    return resources


def job_gpus(resources):
    """GPUs per node a job was given: `gpu`, the count in `gres` (gpu[:type]:N) or Google Batch's `nvidia_gpu`."""
    if resources.get("gpu"):
        return int(resources["gpu"])
    gres = re.fullmatch(r"gpu(?::[^:,]+)?(?::(\d+))?", str(resources.get("gres") or ""))
    if gres:
        return int(gres.group(1) or 1)
    gpu = resources.get("nvidia_gpu")
    if gpu:
        return (
            int(gpu) if str(gpu).isdigit() else 1
        )  # a type name is one GPU of that type
    return 0


def run_options(ddp=False):
    """The step's --accelerator, --devices, --num-nodes and --seed, from the resources the job was given:
    a job with a GPU uses it (config `accelerator`: gpu or auto), any other runs on the CPU. `ddp`: a
    rule of gpu_resources(), with `devices` processes on each of `num_nodes` machines. Then the data
    options (data_options()).
    """

    def options(wildcards, resources):
        gpus = job_gpus(resources)
        accelerator = config["accelerator"] if gpus else "cpu"
        devices, nodes = (DEVICES, NUM_NODES) if ddp else (max(gpus, 1), 1)
        flags = [
            "--seed",
            config["seed"],
            "--accelerator",
            accelerator,
            "--devices",
            devices,
        ]
        flags += ["--num-nodes", nodes] if nodes > 1 else []
        return " ".join(shlex.quote(str(f)) for f in flags + data_options())

    return options


def launch(wildcards, threads, resources):
    """What starts a multi-process step inside a SLURM allocation: srun, one task per device and node
    (Lightning reads its rank from srun's environment and refuses `srun --ntasks`). Elsewhere, and for
    one process, nothing: Lightning starts the processes of a one-machine run itself."""
    if not resources.get("mpi") or CONTAINERS:
        return ""
    srun = f"srun --nodes={NUM_NODES} --ntasks-per-node={DEVICES} --cpus-per-task={threads} --kill-on-bad-exit=1"
    return f"${{SLURM_JOB_ID:+{srun}}}"


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
