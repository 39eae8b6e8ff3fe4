"""The shipped profiles plan the workflow (dry runs with their executor plugins), each rule asking for
what it uses: GPU rules their GPUs, tasks and nodes from `devices`/`num_nodes`, every other rule none;
and `--config` values read as YAML."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from object_store import AWS_ENV, MotoServer

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
GPU_RULES = ("train_scvi", "predict_scvi", "train_socam", "predict_socam")
CPU_RULES = ("simulate", "mean_var", "tdigest", "hvg", "pca", "export", "report_plots")


def dry_run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``snakemake -n -p ...`` with a stub ``apptainer`` on PATH (profiles with containers check it exists)."""
    stub = tmp_path / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.3.0'\n")
    (stub / "apptainer").chmod(0o755)
    path = f"{stub}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    result = subprocess.run(
        [SNAKEMAKE, "-n", "-p", "--config", f"results={tmp_path}/results", *args], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, **(env or {}), "PATH": path},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def jobs(output: str) -> dict[str, dict[str, str]]:
    """Each planned rule's resources and shell command, from the dry run's listing."""
    planned: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match:
            resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
            shell = block.split("Shell command:", 1)[1] if "Shell command:" in block else ""
            planned[match.group(1)] = {"resources": resources.group(1) if resources else "", "shell": shell}
    return planned


def resource(job: dict[str, str], name: str) -> str | None:
    match = re.search(rf"(?:^|, ){name}=([^,]+)", job["resources"])
    return match.group(1) if match else None


def test_slurm_profile_gives_gpu_rules_their_gpus_tasks_and_partition(tmp_path: Path) -> None:
    output = dry_run(tmp_path, "devices=2", "--profile", "workflow/profiles/slurm")
    planned = jobs(output)
    print("\n".join(f"{rule}: {planned[rule]['resources']}" for rule in (*GPU_RULES, "mean_var")))
    for rule in GPU_RULES:
        job = planned[rule]
        assert (resource(job, "slurm_partition"), resource(job, "gpu"), resource(job, "tasks_per_node")) == ("gpu", "2", "2")
        assert resource(job, "nodes") == "1" and resource(job, "mpi") == "srun"
        # (a dry run scales threads to its cores; sbatch and srun get the rule's)
        assert re.search(r"srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=\d", job["shell"])
        assert "--accelerator auto --devices 2" in job["shell"]
    for rule in CPU_RULES:
        job = planned[rule]
        assert resource(job, "slurm_partition") == "cpu" and resource(job, "gpu") is None and resource(job, "mpi") is None
        if rule not in ("simulate", "export", "report_plots"):
            assert "--accelerator cpu --devices 1" in job["shell"] and "srun" not in job["shell"]


def test_slurm_profile_spans_nodes_with_per_node_gpus(tmp_path: Path) -> None:
    planned = jobs(dry_run(tmp_path, "devices=2", "num_nodes=2", "--profile", "workflow/profiles/slurm"))
    for rule in GPU_RULES:
        job = planned[rule]
        assert (resource(job, "gres"), resource(job, "nodes"), resource(job, "gpu")) == ("gpu:2", "2", None)
        assert "srun --nodes=2 --ntasks-per-node=2" in job["shell"] and "--devices 2 --num-nodes 2" in job["shell"]
    # one GPU per node: the plugin takes no tasks_per_node=1, so the job asks for one task per GPU
    planned = jobs(dry_run(tmp_path, "num_nodes=2", "--profile", "workflow/profiles/slurm"))
    job = planned["train_scvi"]
    assert (resource(job, "tasks"), resource(job, "tasks_per_gpu"), resource(job, "gres")) == ("2", "1", "gpu:1")


def test_slurm_profile_with_containers_and_the_gpu_profile(tmp_path: Path) -> None:
    planned = jobs(dry_run(tmp_path, "devices=2", "--profile", "workflow/profiles/slurm",
                           "--profile", "workflow/profiles/apptainer"))
    job = planned["train_scvi"]
    assert resource(job, "gpu") == "2" and resource(job, "slurm_partition") == "gpu"
    assert "srun" not in job["shell"]  # no srun in the image: Lightning starts the 2 processes itself
    planned = jobs(dry_run(tmp_path, "--profile", "gpu"))
    for rule in (*GPU_RULES, "mean_var", "tdigest", "hvg", "pca"):
        assert resource(planned[rule], "gpu") == "1", rule
        assert "--accelerator auto" in planned[rule]["shell"]
    for rule in ("simulate", "export", "report_plots"):
        assert resource(planned[rule], "gpu") is None


@pytest.mark.parametrize("profile", ["kubernetes", "googlebatch"])
def test_cloud_profiles_plan_with_their_executor_and_object_storage(
    profile: str, moto: MotoServer, tmp_path: Path
) -> None:
    """Their storage is an S3 bucket on 127.0.0.1 here (Google Batch's is GCS, which no test can reach)."""
    bucket = f"plan-{profile}"
    moto.client().create_bucket(Bucket=bucket)
    output = dry_run(tmp_path, "--profile", f"workflow/profiles/{profile}",
                     *moto.snakemake_options(bucket, tmp_path / "staged"), env=AWS_ENV)
    planned = jobs(output)
    assert f"s3://{bucket}/" in output  # every path is in the bucket
    for rule in GPU_RULES:
        job = planned[rule]
        assert resource(job, "gpu") == "1"
        if profile == "kubernetes":
            assert resource(job, "gpu_manufacturer") == "nvidia"
        else:
            assert resource(job, "nvidia_gpu") == "nvidia-tesla-t4"
    for rule in CPU_RULES:
        job = planned[rule]
        assert resource(job, "gpu") is None and resource(job, "nvidia_gpu") is None
        assert resource(job, "gpu_manufacturer") is None


def test_command_line_config_values_are_read_as_yaml(tmp_path: Path) -> None:
    output = dry_run(tmp_path, "cell_type_key=null", "devices=2", "train_scvi={max_epochs: 3, n_latent: 5}",
                     "--cores", "2")
    planned = jobs(output)
    assert "train_socam" not in planned and "predict_socam" not in planned  # null, not the column 'null'
    assert "--max-epochs 3 --n-latent 5" in planned["train_scvi"]["shell"] and "--devices 2" in planned["train_scvi"]["shell"]
    output = dry_run(tmp_path, "batch_key=~", "--cores", "2")
    assert "--batch-key" not in jobs(output)["mean_var"]["shell"]
