"""Handing a rendered script to the cluster: `sbatch` for SLURM profiles, submitit's local executor for `local`.

Why not submitit's SLURM executor: its batch script runs a pickled function, so the launch command
(srun / torchrun / neuron_parallel_compile) would not be visible in `--dry-run` nor in the job's
folder; its USR2 handler requeues from inside the signal, before the trainer has saved; and it has no
torchrun-per-node style. A plain sbatch script does all three, and is what an operator can read.
Locally, submitit gives us a detached job with logs and a handle to wait on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recpre.errors import UserError
from recpre.launch.profile import ClusterProfile, time_to_minutes


class JobFailed(Exception):
    """sbatch refused a script, or a job this command waited for failed (exit code 1, not a user error)."""


@dataclass
class Submitted:
    """What a submission returns: the job id, the script on disk and, for local jobs, the submitit job."""

    job_id: str
    script: Path
    handle: object | None = None
    log: Path | None = None  # where the job's output goes (local: submitit's log; SLURM: the sbatch --output)

    def wait(self) -> None:
        """Block until a local job ends; raise with its log tail if it failed (SLURM jobs: no-op)."""
        if self.handle is None:
            return
        job = self.handle
        while not job.done():  # type: ignore[attr-defined]
            time.sleep(0.5)
        if job.exception() is not None:  # type: ignore[attr-defined]
            err = Path(job.paths.stderr)  # type: ignore[attr-defined]
            tail = err.read_text(errors="replace").splitlines()[-15:] if err.exists() else []
            raise JobFailed(f"local job {self.job_id} failed; its log: {err}\n" + "\n".join(tail))


def write_script(text: str, directory: Path, stem: str) -> Path:
    """Keep every submitted script next to its logs (named by time, so requeues and resubmits don't collide)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.sh"
    n = 1
    while path.exists():
        path = directory / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{n}.sh"
        n += 1
    path.write_text(text)
    path.chmod(0o755)
    return path


def sbatch(script: Path, *, dependency: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit with `sbatch --parsable`; returns the job id."""
    if shutil.which("sbatch", path=(env or os.environ).get("PATH")) is None:
        raise UserError("sbatch is not on PATH; submit from a SLURM login node or use --cluster local")
    argv = ["sbatch", "--parsable"]
    if dependency:
        argv.append(f"--dependency=afterok:{dependency}")
    argv.append(str(script))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        script.unlink(missing_ok=True)  # not submitted: don't leave it beside the logs as if it ran
        raise JobFailed(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def run_script(script: str, env: dict[str, str] | None = None) -> int:
    """The function a local submitit job runs: the same script sbatch would, its output in the job log."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(["bash", script], env=full_env, check=False, stdout=sys.stdout, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited with code {proc.returncode}")
    return proc.returncode


def build_local_executor(folder: Path, time_limit: str, name: str):  # -> submitit.LocalExecutor
    """submitit's local executor with the job's time limit (its default of 2 minutes would kill real runs)."""
    try:
        import submitit
    except ImportError as err:
        raise UserError("the local cluster profile needs submitit: pip install 'recpre[launch]'") from err
    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=time_to_minutes(time_limit), name=name)
    return executor


def submit_scripts(
    profile: ClusterProfile,
    scripts: Sequence[tuple[Path, dict[str, str]]],
    *,
    log_dir: Path,
    time_limit: str,
    name: str,
    dependency: str | None = None,
) -> list[Submitted]:
    """Submit scripts, each with extra environment for local runs (e.g. an array task id).

    SLURM: each script is one sbatch call (arrays are declared inside the script). Local: one submitit
    job per script, run one after another by the caller's `wait()`.
    """
    out: list[Submitted] = []
    if profile.executor == "slurm":
        for script, _env in scripts:
            out.append(Submitted(sbatch(script, dependency=dependency), script))
        return out
    executor = build_local_executor(log_dir / "submitit", time_limit, name)
    for script, env in scripts:
        job = executor.submit(run_script, str(script), env)
        out.append(Submitted(str(job.job_id), script, job, Path(job.paths.stdout)))
    return out
