"""A throw-away one-node Slurm cluster on localhost, for the cluster test (and for trying the profile).

Debian's packages (``slurmctld slurmd slurm-client munge``, installed with --no-install-recommends)
are enough; nothing is written outside a private state folder and no systemd is needed:

- ``munged`` runs as the ``munge`` user with its own key, socket and pid file (in a folder of its
  own under /tmp, removed on stop);
- ``slurmctld`` and ``slurmd`` run as root with a private ``slurm.conf`` (``SLURM_CONF`` points
  clients there), on free ports, so an existing Slurm on the machine is never touched;
- the node has a fake GPU (``GresTypes=gpu``, ``Gres=gpu:1``, gres.conf ``File=/dev/null``) and
  two partitions, ``cpu`` (default) and ``gpu``, so GPU rules are scheduled as GPU jobs (they then
  run on the CPU);
- there is no slurmdbd, so ``sacct`` cannot answer: the profile's ``slurm-status-command: squeue``
  is what makes the executor plugin work here. ``MinJobAge`` keeps finished jobs visible to
  ``squeue --states=all`` for the test's whole run.

Every daemon is stopped by its pid file (SIGTERM, then SIGKILL), also when starting fails halfway.

By hand, as root::

    python tests/slurm/local_cluster.py start /tmp/slurm-test   # prints: export SLURM_CONF=...
    python tests/slurm/local_cluster.py stop /tmp/slurm-test
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "srun", "scancel")
CPU_PARTITION = "cpu"
GPU_PARTITION = "gpu"


def missing_tools() -> list[str]:
    """Programs the cluster needs that are not installed (empty when it can start)."""
    missing = [t for t in DAEMONS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    missing += [t for t in CLIENTS if shutil.which(t) is None]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("user 'munge'")
    return missing


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class LocalCluster:
    """Paths and commands of one local cluster living in ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.pid_files = {
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "slurmd": self.root / "run" / "slurmd.pid",
        }

    # munged runs as the munge user, which cannot enter private folders such as pytest's temporary
    # ones: its files live in their own folder under /tmp, named in <root>/munge.path
    @property
    def munge_dir(self) -> Path:
        pointer = self.root / "munge.path"
        if not pointer.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            pointer.write_text(tempfile.mkdtemp(prefix="wsi-asmil-munge-"))
        return Path(pointer.read_text().strip())

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    # --- environment for clients (sbatch, squeue, snakemake's plugin) -----------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        for var in [v for v in env if v.startswith(("SLURM_JOB", "SLURM_CLUSTER", "SBATCH_", "SRUN_"))]:
            del env[var]
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # --- configuration -----------------------------------------------------------------------------
    def write_config(self, cpus: int | None = None, memory_mb: int | None = None, min_job_age: int = 3600) -> None:
        """slurm.conf and gres.conf for one node with ``cpus`` CPUs and one fake GPU.

        ``SlurmdParameters=config_overrides`` lets the node announce more memory than the machine
        has (memory is not a consumable here: ``CR_Core``), so the profile's per-rule requests fit.
        """
        cpus = cpus or os.cpu_count() or 2
        memory_mb = memory_mb or max(_real_memory_mb(), 65536)
        for sub in ("etc", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""# generated by tests/slurm/local_cluster.py: a one-node test cluster
ClusterName=wsiasmiltest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge={min_job_age}
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={CPU_PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName={GPU_PARTITION} Nodes={self.host} MaxTime=INFINITE State=UP
"""
        )
        (self.root / "etc" / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/null\n")
        # snakemake-executor-plugin-slurm-jobstep removes every SLURM_* variable, SLURM_CONF included,
        # before its `srun` inside a job; a cluster with its slurm.conf in the default place does not
        # care, this private one does: `srun` on the PATH of the jobs is a shim that puts it back.
        (self.root / "bin").mkdir(exist_ok=True)
        shim = self.root / "bin" / "srun"
        shim.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun") or "/usr/bin/srun"} "$@"\n')
        shim.chmod(0o755)

    # --- daemons -----------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o700)
        os.chmod(key, 0o600)
        proc = subprocess.run(
            [
                _exe("munged"),
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                "--force",  # the state folder's parents (/tmp) are world-writable
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"munged failed to start ({proc.returncode}): {proc.stderr.strip()}")
        self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd and wait until the node is idle."""
        if os.geteuid() != 0:
            raise PermissionError("a local Slurm cluster needs root (slurmd and munged)")
        if not self.conf.exists():
            self.write_config()
        self._start_munge()
        self.run(_exe("slurmctld"), "-f", str(self.conf), "-i")
        self.run(_exe("slurmd"), "-f", str(self.conf), "-N", self.host)

        def node_idle() -> bool:
            out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False, timeout=10)
            states = {line.strip().rstrip("*~#") for line in out.stdout.splitlines() if line.strip()}
            return out.returncode == 0 and states == {"idle"}

        self._wait(node_idle, timeout, "the node to become idle")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"local Slurm cluster: timed out waiting for {what}\n{self.logs()}")

    def stop(self) -> list[str]:
        """Cancel leftover jobs, then stop every daemon by its pid file. Returns what was stopped."""
        if self.conf.exists() and self.pid_files["slurmctld"].exists():
            self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=10)
        stopped = []
        pid_files = {**self.pid_files}
        if (self.root / "munge.path").exists():
            pid_files["munged"] = self.munge_dir / "munged.pid"
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = pid_files.get(name)
            if pid_file is None:
                continue
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().split()[0])
            except (ValueError, IndexError):
                continue
            if _terminate(pid):
                stopped.append(f"{name}({pid})")
            pid_file.unlink(missing_ok=True)
        if (self.root / "munge.path").exists() and "munged" in pid_files:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            (self.root / "munge.path").unlink()
        return stopped

    def logs(self, tail: int = 40) -> str:
        parts = []
        logs = [self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log"]
        if (self.root / "munge.path").exists():
            logs.append(self.munge_dir / "munged.log")
        for log in logs:
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 15) -> bool:
    """SIGTERM, wait, SIGKILL. True if the process existed."""
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


@contextmanager
def local_cluster(root: str | os.PathLike[str], **config) -> Iterator[LocalCluster]:
    """A running cluster for the ``with`` block; its daemons are stopped on the way out, always."""
    cluster = LocalCluster(root)
    cluster.write_config(**config)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: local_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalCluster(argv[1])
    if argv[0] == "start":
        cluster.write_config()
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        print("stopped:", " ".join(cluster.stop()) or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
