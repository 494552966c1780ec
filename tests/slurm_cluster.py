"""A real single-node SLURM (slurmctld + slurmd on localhost) for tests marked `slurm`.

Started in a tmp folder from the recipe in REFERENCE.md section 5 when `slurmctld` is installed
(`.ci/run` installs the Debian packages), skipped with the reason otherwise. Needs root: the daemons
run as root and munged as its own user. A `sacct` stand-in on PATH answers from `scontrol show job`,
because this cluster has no accounting database. Use it with `pytest_plugins = ["slurm_cluster"]` or
import `slurm_cluster` into a test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_SACCT_STANDIN = """#!/usr/bin/env python3
# sacct stand-in: answers `sacct -o JobID,State,... --parsable2 -j IDS` from `scontrol show job -o`.
import subprocess, sys
args = sys.argv[1:]
ids = []
fields = ["JobID", "State", "NodeList"]
for i, a in enumerate(args):
    if a in ("-j", "--jobs") and i + 1 < len(args):
        ids = args[i + 1].split(",")
    elif a.startswith("--jobs="):
        ids = a.split("=", 1)[1].split(",")
    elif a in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(",")
    elif a.startswith("--format="):
        fields = a.split("=", 1)[1].split(",")
print("|".join(fields))
for job in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        row = {"JobID": kv.get("JobId", job), "State": kv.get("JobState", "UNKNOWN"),
               "NodeList": kv.get("NodeList", "")}
        if kv.get("ArrayTaskId"):
            row["JobID"] = kv.get("ArrayJobId", job) + "_" + kv["ArrayTaskId"]
        print("|".join(row.get(f, "") for f in fields))
"""


@dataclass
class SlurmCluster:
    """Handles for a running test cluster: `env` is what clients (sbatch, scontrol) need."""

    root: Path
    conf: Path
    env: dict[str, str]

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(t.split("=", 1) for t in out.split() if "=" in t)

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 300) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s; wanted one of {sorted(states)}")


def slurm_skip_reason() -> str | None:
    """Why a real SLURM cannot be started here, or None when it can."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the single-node SLURM fixture runs its daemons as root"
    return None


def _write_conf(root: Path, auth: str) -> Path:
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    lines = [
        "ClusterName=recpretest",
        "SlurmctldHost=localhost",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthType=auth/{auth}",
        f"CredType=cred/{auth}",
        "AuthInfo=cred_expire=10" if auth == "munge" else "",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobRequeue=1",
        "KillWait=10",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]
    conf.write_text("\n".join(line for line in lines if line) + "\n")
    return conf


def _start_munge() -> bool:
    if shutil.which("munged") is None:
        return False
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return True
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists() and shutil.which("mungekey"):
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=False)
    proc = subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], capture_output=True, text=True)
    return proc.returncode == 0


def _stop_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def start_cluster(root: Path) -> SlurmCluster:
    """Start slurmctld + slurmd under `root`; the caller stops them with `stop_cluster`."""
    for sub in ("state", "spool", "bin"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = _write_conf(root, "munge" if _start_munge() else "none")
    sacct = root / "bin" / "sacct"
    sacct.write_text(_SACCT_STANDIN)
    sacct.chmod(0o755)
    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(key)
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    subprocess.run(["slurmctld", "-c", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-c", "-f", str(conf), "-N", "localhost"], env=env, check=True, capture_output=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        if out and out.split()[0].rstrip("*") in {"idle", "mixed", "allocated"}:
            return cluster
        time.sleep(0.3)
    logs = "".join((root / n).read_text()[-2000:] for n in ("slurmctld.log", "slurmd.log") if (root / n).exists())
    stop_cluster(cluster)
    raise RuntimeError(f"single-node SLURM did not come up in 30 s; logs:\n{logs}")


def stop_cluster(cluster: SlurmCluster) -> None:
    cluster.run("scancel", "--full", "--user", "root", check=False)
    _stop_pidfile(cluster.root / "slurmd.pid")
    _stop_pidfile(cluster.root / "slurmctld.pid")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A fresh single-node SLURM for one test module (job ids restart at 1: use fresh log folders)."""
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
