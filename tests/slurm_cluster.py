"""A real single-node Slurm cluster (Debian's slurm-wlm and munge) in a temporary directory.

munged, slurmctld and slurmd run as this machine's root user with every file, socket and
port of their own, so the tests never touch a system Slurm. The node declares more CPUs
than the machine has (SlurmdParameters=config_overrides) so that a job can hold one CPU
per rank, and eight count-only GPUs so that the templates' GPU requests are accepted
unchanged; CPU ranks simply never use them. ``extra_nodes`` more nodes exist only in the
configuration, as powered-down cloud nodes (State=CLOUD): they let ``sbatch --test-only``
accept a multi-node header, while a one-node job runs on the live node (lower Weight).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.multiprocess import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "shellcheck")


def _find(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def missing_programs() -> list[str]:
    return [name for name in DAEMONS if _find(name) is None]


def _program(name: str) -> str:
    return _find(name) or name


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 128, gpus: int = 8, extra_nodes: int = 3) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.cpus, self.gpus, self.extra_nodes = cpus, gpus, extra_nodes
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._daemons: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, scontrol) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for folder in ("munge", "state", "spool", "log"):
            (self.root / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        extra = (
            (
                f"NodeName=hpd-cloud[1-{self.extra_nodes}] CPUs={self.cpus} Gres=gpu:{self.gpus} "
                "State=CLOUD Weight=100\n"
            )
            if self.extra_nodes
            else ""
        )
        nodes = f"{self.node}" + (f",hpd-cloud[1-{self.extra_nodes}]" if self.extra_nodes else "")
        self.conf.write_text(
            f"ClusterName=hpdtest\n"
            f"SlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\n"
            f"SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nCredType=cred/munge\n"
            # A requeued job may start only after its old credential expired (default 120 s),
            # and the scheduler looks at eligible jobs every sched_interval (default 60 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10\n"
            "SchedulerParameters=sched_interval=2,bf_interval=2\n"
            f"StateSaveLocation={self.root}/state\nSlurmdSpoolDir={self.root}/spool\n"
            f"SlurmctldPidFile={self.root}/slurmctld.pid\nSlurmdPidFile={self.root}/slurmd.pid\n"
            f"SlurmctldLogFile={self.root}/log/slurmctld.log\nSlurmdLogFile={self.root}/log/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SchedulerType=sched/backfill\nReturnToService=2\nJobRequeue=1\n"
            "SlurmdParameters=config_overrides\nGresTypes=gpu\n"
            "AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "KillWait=10\nMinJobAge=600\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 "
            f"Gres=gpu:{self.gpus} State=UNKNOWN\n"
            + extra
            + f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP\n"
        )
        # gres/gpu needs device files: links to /dev/null stand in for /dev/nvidia0..N-1.
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for index in range(self.gpus):
            (devices / f"gpu{index}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={self.node} Name=gpu File={devices}/gpu[0-{self.gpus - 1}]\n"
        )

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._write_config()
        munge = self.root / "munge"
        subprocess.run(
            [
                _program("munged"),
                "--force",
                f"--key-file={munge / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
            check=True,
        )
        env = dict(os.environ, **self.env)
        log = open(self.root / "log" / "daemons.out", "ab")
        self._daemons.append(
            subprocess.Popen(
                [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        self._daemons.append(
            subprocess.Popen(
                [_program("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.scontrol("show", "node", self.node, check=False)
            if "State=IDLE" in state:
                return self
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({daemon.args[0]}):\n{self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node never became idle:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("log/daemons.out", "log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def run(
        self, *command: str, check: bool = True, env: dict | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, **self.env, **(env or {}))
        return subprocess.run(
            command, env=full_env, cwd=cwd, capture_output=True, text=True, check=check
        )

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = self.run(_program("scontrol"), *args, check=False)
        if check and result.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr}")
        return result.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's key=value fields for a job (kept for MinJobAge seconds after it ends)."""
        fields = {}
        for item in self.scontrol("show", "job", "-o", str(job_id)).split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(
        self,
        job_id: int,
        timeout: float,
        until: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
        ),
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in until:
                return job
            time.sleep(1.0)
        raise TimeoutError(
            f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s"
        )

    def stop(self) -> None:
        for daemon in reversed(self._daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
