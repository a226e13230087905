"""A two-node cluster on this one machine, for the launch tests (`make test-cluster`, tests/test_launch_cluster.py).

Nodes `dtr-node-a` = 127.0.0.2 and `dtr-node-b` = 127.0.0.3 (loopback addresses: nothing else is contacted).
- ssh: an OpenSSH server listening on both addresses (a throwaway host key and user key in the cluster's temp
  directory), and an `ssh` wrapper first on PATH that reads the cluster's own client config, so DeepSpeed's
  PDSH runner and its `ssh HOST hostname` check reach the nodes by name without touching ~/.ssh or /etc.
- SLURM (Debian's slurm-wlm, auth/none, no munge): slurmctld and one slurmd per node (`slurmd -N NODE`, which
  this build supports), from a slurm.conf generated in the temp directory, ports picked free.
Every daemon runs in the foreground as a child of the test process (`-D`) and is ended by its pid on teardown,
after its jobs are cancelled, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = {"dtr-node-a": "127.0.0.2", "dtr-node-b": "127.0.0.3"}
NEEDED = (
    "sshd",
    "ssh",
    "ssh-keygen",
    "pdsh",
    "slurmctld",
    "slurmd",
    "sbatch",
    "scontrol",
    "squeue",
    "scancel",
)
SBIN = ("/usr/sbin", "/usr/bin")


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([*SBIN, os.environ.get("PATH", "")]))


def missing_tools() -> list[str]:
    return [name for name in NEEDED if which(name) is None]


def free_port_on(addresses: list[str]) -> int:
    """A port free on every address (checked by binding each), from the OS's ephemeral range."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {addresses}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


SSHD_CONFIG = """ListenAddress {a}:{port}
ListenAddress {b}:{port}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PrintMotd no
"""

SSH_CONFIG = """Host dtr-node-a
  HostName {a}
Host dtr-node-b
  HostName {b}
Host dtr-node-*
  Port {port}
  User {user}
  IdentityFile {dir}/user_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
"""

SLURM_CONF = """ClusterName=dtrtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=dtr-node-a NodeHostname=localhost NodeAddr={a} Port={port_a} CPUs=2 State=UNKNOWN
NodeName=dtr-node-b NodeHostname=localhost NodeAddr={b} Port={port_b} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LoopbackCluster:
    """Start with `start()`, end with `stop()` (idempotent; kills what it started, by pid)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.bin = self.dir / "bin"
        self.procs: list[subprocess.Popen] = []
        self.slurm_conf = self.dir / "slurm.conf"
        self.hostfile = self.dir / "hostfile"

    # ---------------------------------------------------------------- ssh + pdsh

    def _start_sshd(self) -> None:
        a, b = NODES.values()
        self.ssh_port = free_port_on([a, b])
        for key in ("host_key", "user_key"):
            subprocess.run(
                [which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key)], check=True
            )
        shutil.copy(self.dir / "user_key.pub", self.dir / "authorized_keys")
        fmt = {"a": a, "b": b, "port": self.ssh_port, "dir": self.dir, "user": os.environ.get("USER", "root")}
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(**fmt))
        (self.dir / "ssh_config").write_text(SSH_CONFIG.format(**{**fmt, "user": "root"}))
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {which("ssh")} -F {self.dir}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        log = open(self.dir / "sshd.log", "w")  # noqa: SIM115  (closed with the process)
        self.procs.append(
            subprocess.Popen(
                [which("sshd"), "-D", "-e", "-f", str(self.dir / "sshd_config")], stdout=log, stderr=log
            )
        )
        self.hostfile.write_text("".join(f"{name} slots=1\n" for name in NODES))
        wait_for(lambda: self.ssh("dtr-node-b", "true").returncode == 0, 20, "sshd on the two loopback nodes")

    def ssh(self, node: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", node, command], env=self.env(), capture_output=True, text=True, timeout=30
        )

    # ---------------------------------------------------------------- SLURM

    def _start_slurm(self) -> None:
        a, b = NODES.values()
        ports = {
            k: free_port_on(["127.0.0.1", a, b]) for k in ("ctld_port", "slurmd_port", "port_a", "port_b")
        }
        (self.dir / "state").mkdir(exist_ok=True)
        for node in NODES:
            (self.dir / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.slurm_conf.write_text(SLURM_CONF.format(dir=self.dir, a=a, b=b, **ports))
        env = self.env()
        self.procs.append(subprocess.Popen([which("slurmctld"), "-D", "-c", "-i"], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        for node in NODES:
            self.procs.append(subprocess.Popen([which("slurmd"), "-D", "-N", node], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

        def idle() -> bool:
            out = subprocess.run(
                [which("sinfo") or "sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True
            )
            return out.returncode == 0 and out.stdout.split() == ["idle", "2"]

        wait_for(idle, 60, "slurmctld and two slurmd (sinfo: 2 idle nodes)")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a command run on this cluster: the ssh wrapper first on PATH, SLURM_CONF."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.bin), *SBIN, env.get("PATH", "")])
        env["SLURM_CONF"] = str(self.slurm_conf)
        env.update(extra or {})
        return env

    def start(self) -> LoopbackCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_sshd()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.slurm_conf.is_file():
            subprocess.run([which("scancel") or "scancel", "--full", "--user", str(os.getuid())], env=self.env(),
                           capture_output=True, timeout=30)  # fmt: skip
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
