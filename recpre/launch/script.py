"""Batch scripts from a cluster profile and a job: what `--dry-run` prints and what sbatch runs.

Every value that comes from a profile or the command line is shell-quoted (`shlex.quote`); the
only unquoted shell text is what a profile's `setup` lines and this module write on purpose.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from recpre.errors import UserError
from recpre.launch.profile import ClusterProfile

GENERATED_BY = "written by launchers/submit.py"
_SBATCH_SAFE = re.compile(r"^[\w@%+=:,./-]+$")


@dataclass(frozen=True)
class TrainJob:
    """One training submission. Paths are absolute: a requeued job must find the same run folder."""

    name: str
    workdir: Path
    config: str | None
    overrides: list[str] = field(default_factory=list)
    out_dir: Path = Path("runs/run")
    nodes: int = 1
    time: str = "01:00:00"
    flags: list[str] = field(default_factory=list)  # train.py flags, e.g. --compile-sweep

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "slurm"

    def train_args(self) -> list[str]:
        """Arguments after `train.py`: flags, the config, the user's overrides, then the launcher's."""
        args = ["--config", self.config] if self.config else []
        return list(self.flags) + args + list(self.overrides)


def q(value: object) -> str:
    return shlex.quote(str(value))


def sbatch_quote(value: object) -> str:
    """Quote for an `#SBATCH` line, which sbatch parses itself: it knows double quotes and backslashes only."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise UserError(f"sbatch value {text!r} contains a line break; remove it")
    if _SBATCH_SAFE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sbatch_value(key: str, value: object) -> str | None:
    if value is None or value is False:
        return None
    if value is True:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={sbatch_quote(value)}"


def sbatch_lines(profile: ClusterProfile, params: Sequence[tuple[str, object]]) -> list[str]:
    """The launcher's own parameters first, then the profile's, one `#SBATCH --key=value` line each."""
    lines = [_sbatch_value(k, v) for k, v in params]
    lines += [_sbatch_value(k, v) for k, v in profile.sbatch.items()]
    return [line for line in lines if line]


def environment_lines(profile: ClusterProfile, extra: Iterable[tuple[str, str]] = ()) -> list[str]:
    env = dict(profile.env)
    env.update(extra)
    return [f"export {k}={q(v)}" for k, v in env.items()]


def preamble(profile: ClusterProfile, workdir: Path, *, what: str) -> list[str]:
    lines = [
        "",
        f"# {what}, {GENERATED_BY} from cluster profile {profile.name!r}: {profile.description}",
        "# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.",
        "set -o pipefail",
        f"cd {q(workdir)}",
    ]
    if profile.setup:
        lines += ["", "# setup (from the profile)", *profile.setup]
    return lines


def _master_lines(profile: ClusterProfile) -> list[str]:
    return [
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR",
        f"export MASTER_PORT={q(profile.master_port)}",
    ]


def _srun(profile: ClusterProfile, tasks_per_node: int) -> list[str]:
    argv = ["srun", f"--ntasks-per-node={tasks_per_node}"]
    cpus = profile.sbatch.get("cpus-per-task")
    if cpus not in (None, False, True):
        # srun 22.05 no longer inherits --cpus-per-task from sbatch: pass it on explicitly.
        argv.append(f"--cpus-per-task={cpus}")
    return [q(a) for a in argv + profile.srun_args]


def job_python(profile: ClusterProfile) -> str:
    """The interpreter a job runs: the profile's `python`, else on this machine (local) the interpreter that
    submitted it (a bare `python` may be missing or another environment), else `python` from the PATH that
    the profile's setup lines prepare on the compute nodes."""
    if profile.python:
        return profile.python
    return sys.executable if profile.executor == "local" else "python"


def launch_line(profile: ClusterProfile, script_args: Sequence[str], *, wrapper: Sequence[str] = ()) -> str:
    """The command that starts `train.py` (or another script) on every node in the profile's style."""
    py = q(job_python(profile))
    args = " ".join(q(a) for a in script_args)
    wrap = " ".join(q(a) for a in wrapper)
    if profile.executor == "local":
        if profile.devices_per_node == 1:
            cmd = f"{py} -u {args}"
        else:
            cmd = f"{py} -m torch.distributed.run --standalone --nproc_per_node={profile.devices_per_node} {args}"
        return f"{wrap} {cmd}".strip()
    if profile.launch == "task-per-device":
        return " ".join([*_srun(profile, profile.devices_per_node), *([wrap] if wrap else []), py, "-u", args])
    # torchrun-per-node: one srun task per node; node rank and count are read on the node, hence bash -c.
    # The script arguments follow as bash's "$@", so they are quoted once, as everywhere else.
    # SLURM signals every process of the step: torchrun must ignore USR2 (its default action is to die,
    # and srun would then kill the workers mid-save); the workers install their own handler.
    inner = " ".join(
        [
            'trap "" USR2;',
            "exec",
            *([wrap] if wrap else []),
            py,
            "-m torch.distributed.run",
            f"--nproc_per_node={profile.devices_per_node}",
            '--nnodes="$SLURM_NNODES"',
            '--node_rank="$SLURM_NODEID"',
            '--master_addr="$MASTER_ADDR"',
            '--master_port="$MASTER_PORT"',
            '"$@"',
        ]
    )
    return " ".join([*_srun(profile, 1), "bash", "-c", q(inner), "torchrun-per-node", args])


def render_train_script(profile: ClusterProfile, job: TrainJob, *, wrapper: Sequence[str] = ()) -> str:
    """The batch script for a training job (SLURM) or the shell script the local executor runs."""
    lines = ["#!/bin/bash"]
    if profile.executor == "slurm":
        tasks = profile.devices_per_node if profile.launch == "task-per-device" else 1
        params: list[tuple[str, object]] = [
            ("job-name", job.name),
            ("nodes", job.nodes),
            ("ntasks-per-node", tasks),
            ("time", job.time),
            ("output", f"{job.log_dir}/%x-%j.out"),
            ("open-mode", "append"),
            # USR2 to every task this long before the time limit: save, exit, requeue (recpre/preemption.py).
            ("signal", f"USR2@{profile.signal_before_end_s}" if profile.signal_before_end_s else None),
            ("requeue", True),
        ]
        lines += sbatch_lines(profile, params)
    lines += preamble(profile, job.workdir, what="recpre training job")
    extra_env = [("PYTHONUNBUFFERED", "1")]
    lines += ["", "# environment", *environment_lines(profile, extra_env)]
    if profile.executor == "slurm":
        lines += _master_lines(profile)
        lines += ['echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"']
    lines += ["", "# launch", launch_line(profile, ["train.py", *job.train_args()], wrapper=wrapper)]
    return "\n".join(lines) + "\n"


def precompile_job(profile: ClusterProfile, job: TrainJob) -> TrainJob:
    """The Neuron pre-compile run: a compile sweep of the same shapes in its own (throwaway) run folder."""
    out = job.out_dir.with_name(job.out_dir.name + "-precompile")
    overrides = [o for o in job.overrides if not o.startswith(("run.out_dir=", "run.resume="))]
    overrides += [f"run.out_dir={out}", "run.resume=never"]
    return replace(
        job,
        name=f"{job.name}-precompile",
        flags=["--compile-sweep"],
        overrides=overrides,
        out_dir=out,
        time=profile.precompile.time,
    )


def render_precompile_script(profile: ClusterProfile, job: TrainJob) -> str:
    """`neuron_parallel_compile` around the same launch: fills the shared compile cache before the run."""
    pre = precompile_job(profile, job)
    return render_train_script(profile, pre, wrapper=shlex.split(profile.precompile.command))
