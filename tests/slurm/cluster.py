"""A real single-node Slurm (munged + slurmctld + slurmd) on localhost, private to one test session.

Everything lives under one directory: slurm.conf, the munge key, socket, pid and log files, the
controller's state and slurmd's spool. Ports are picked free, and the munge socket is private
(`AuthInfo=socket=...`), so it neither needs nor disturbs a system Slurm or munged. Clients find it
through SLURM_CONF (see `env()`). Daemons are stopped by the PIDs in their pid files, and we wait
for them to exit (a munged restarted while the old one was still exiting once left slurmd hung).

Recipe and pitfalls: /work/shared/MACHINE.md ("A real single-node Slurm inside the sandbox"). The
node advertises CPUS cores (config_overrides) so that 4- and 8-task jobs schedule on a 2-core VM.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun", "munge")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if shutil.which(name) is None and not os.path.exists(f"/usr/sbin/{name}")]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
# Written by tests/slurm/cluster.py: a private single-node Slurm for the test session.
ClusterName=metest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault={mpi}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 8, mpi: str = "none"):
        self.root = Path(root)
        self.cpus = cpus
        self.mpi = mpi
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.pids: dict[str, int] = {}

    # ------------------------------------------------------------------ environment

    def env(self, base: dict | None = None) -> dict:
        """An environment whose Slurm clients talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            env.pop(key)  # never inherit an enclosing job's allocation
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        return proc

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munge()
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, ctld_port=_free_port(), slurmd_port=_free_port(), munge_socket=self.munge_socket,
            mpi=self.mpi, root=self.root, cpus=self.cpus))
        env = self.env()
        # -i: ignore state left by an earlier controller in this directory (there is none normally)
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], env=env, check=True, timeout=30,
                       capture_output=True)
        self.pids["slurmctld"] = self._read_pid(self.root / "slurmctld.pid")
        subprocess.run([_which("slurmd"), "-f", str(self.conf)], env=env, check=True, timeout=30,
                       capture_output=True)
        self.pids["slurmd"] = self._read_pid(self.root / "slurmd.pid")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-o", "%T", check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm's node did not become idle within {timeout:.0f}s "
                           f"(sinfo says {state!r})\n{self.logs()}")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged: clients need execute permission on the socket's directory
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        cmd = ["runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
               f"--log-file={self.munge_dir / 'munged.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}"]
        subprocess.run(cmd, check=True, timeout=30, capture_output=True)
        self.pids["munged"] = self._read_pid(self.munge_dir / "munged.pid")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"munged did not answer on {self.munge_socket}\n{self.logs()}")

    @staticmethod
    def _read_pid(path: Path, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = path.read_text().strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no pid file {path}")

    def stop(self, timeout: float = 30) -> None:
        """Cancel what is left, then SIGTERM each daemon by PID (slurmd, slurmctld, munged) and wait."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "--partition", "debug", check=False, timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job -o` as a dict ({} once the controller has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s\n{self.logs()}")

    def logs(self, lines: int = 25) -> str:
        out = []
        for path in (self.root / "slurmctld.log", self.root / "slurmd.log", self.munge_dir / "munged.log"):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
