"""A one-node SLURM cluster on this machine, for the tests that run the workflow's SLURM profile.

Debian's ``slurm-wlm`` and ``munge`` (installed here when missing and we are root), a private munge
daemon and key, a ``slurm.conf`` with partitions ``cpu`` and ``gpu``, two count-only GPUs (``gres.conf``
points at two empty files), no accounting database. Every daemon listens on 127.0.0.1 only, on ports
chosen free, runs in the foreground as our child, and is stopped by its own process id.

The configuration has to be at SLURM's default place, /etc/slurm: Snakemake's SLURM plugin clears every
SLURM_* variable (SLURM_CONF too) before it starts a job's step, so the ``srun`` inside a job finds only
that. The files are written there only where no SLURM is configured (or a run of this module left them),
and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
NODE = "node1"
CONF_DIR = Path("/etc/slurm")
MARK = "# written by cellarium-steps tests/slurm_cluster.py; removed when its cluster stops\n"


def install_reason() -> str | None:
    """Why a cluster cannot be had here (None: it can): installs the packages when root and missing."""
    if os.geteuid() != 0:
        return "a test SLURM cluster needs root (its daemons, /etc/slurm)"
    conf = CONF_DIR / "slurm.conf"
    if conf.exists() and not conf.read_text().startswith(MARK):
        return f"{conf} configures a SLURM cluster here already; a test cluster will not replace it"
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch", "srun")):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class SlurmCluster:
    """``start()`` brings up munged, ``slurmctld -c`` and then ``slurmd``; ``stop()`` ends exactly those."""

    def __init__(self, root: Path, cpus: int = 8, gpus: int = 2, memory_mb: int = 16000):
        self.root = root
        self.cpus, self.gpus, self.memory_mb = cpus, gpus, memory_mb
        self.conf = CONF_DIR / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.setup_s = 0.0

    @property
    def env(self) -> dict[str, str]:
        """The environment in which sbatch, squeue, scancel (and Snakemake's SLURM plugin) find this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def env_overrides(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def job_of_rule(self, rule: str) -> str:
        """The id of the running SLURM job of a Snakemake rule (the plugin comments each job `rule_<name>`)."""
        for line in self._run("squeue", "-h", "-t", "RUNNING", "-o", "%i %k").stdout.splitlines():
            job, _, comment = line.partition(" ")
            if comment.strip() == f"rule_{rule}":
                return job
        raise LookupError(f"no running SLURM job of rule {rule}: {self._run('squeue').stdout}")

    def write_config(self) -> None:
        root = self.root
        for name in ("state", "spool", "log"):
            (root / name).mkdir(parents=True, exist_ok=True)
        devices = []
        for i in range(self.gpus):  # count-only GPUs: slurmd wants a file per device, nothing reads it
            path = root / f"gpu{i}"
            path.touch()
            devices.append(str(path))
        host = socket.gethostname().split(".")[0]
        ctld_port, d_port = _free_ports(2)
        munge_socket = root / "munge.socket"
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(MARK + f"""\
ClusterName=cellarium
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=cpu Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={NODE} MaxTime=INFINITE State=UP
""")
        (CONF_DIR / "gres.conf").write_text(
            MARK + "AutoDetect=off\n" + "".join(f"NodeName={NODE} Name=gpu File={d}\n" for d in devices)
        )
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def _spawn(self, *command: str, log: str) -> subprocess.Popen:
        out = open(self.root / "log" / log, "ab")
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                   start_new_session=True)
        out.close()
        self.processes.append(process)
        return process

    def start(self, timeout_s: float = 60) -> None:
        begin = time.monotonic()
        self.write_config()
        root = self.root
        self._spawn("munged", "--foreground", "--force", f"--key-file={root}/munge.key",
                    f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
                    f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge.seed", log="munged.out")
        self._wait(lambda: (root / "munge.socket").exists(), "munged's socket", timeout_s)
        # -c: a clean start (no state from an earlier cluster); slurmctld before slurmd, which registers with it.
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf), log="slurmctld.out")
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0
                   and "UP" in self._run("scontrol", "ping").stdout, "slurmctld", timeout_s)
        self._spawn("slurmd", "-D", "-N", NODE, "-f", str(self.conf), log="slurmd.out")
        self._wait(self._node_idle, "slurmd to register an idle node", timeout_s)
        self.setup_s = time.monotonic() - begin

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30)

    def _node_idle(self) -> bool:
        state = self._run("sinfo", "-h", "-n", NODE, "-o", "%T").stdout.split()
        return bool(state) and all(s.rstrip("*") == "idle" for s in state)

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: waiting for {what} failed\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued, then end our daemons (slurmd first), each by its own pid."""
        if self.processes:
            try:
                self._run("scancel", "--full", "-u", "root")
            except (OSError, subprocess.SubprocessError):
                pass
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        for name in ("slurm.conf", "gres.conf"):
            path = CONF_DIR / name
            if path.exists() and path.read_text().startswith(MARK):
                path.unlink()
