"""Evaluation over many checkpoints as one SLURM job array: task i runs `evaluate/run.py` on checkpoint i."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from recpre.errors import UserError
from recpre.launch.profile import ClusterProfile
from recpre.launch.script import environment_lines, launch_line, preamble, q, sbatch_lines

EVAL_SCRIPT = "evaluate/run.py"
_PLACEHOLDER = "@CHECKPOINT@"  # left unquoted by shlex.quote, swapped for the shell variable


@dataclass(frozen=True)
class EvalJob:
    """One array: one task per checkpoint, each on one node with one task."""

    name: str
    workdir: Path
    checkpoints: list[str]
    log_dir: Path
    time: str = "01:00:00"
    extra_args: list[str] = field(default_factory=list)
    max_parallel: int | None = None


def check_checkpoints(checkpoints: Sequence[str], cwd: Path) -> list[str]:
    """Absolute checkpoint paths; a missing one is an error now rather than a failed array task later."""
    if not checkpoints:
        raise UserError("--eval needs at least one checkpoint folder (a step-NNNNNNNN folder, a run folder or latest)")
    out = []
    for item in checkpoints:
        path = Path(item)
        path = path if path.is_absolute() else cwd / path
        if not path.exists():
            raise UserError(f"checkpoint {item} does not exist; check the paths given to --eval")
        out.append(str(path.resolve()))
    return out


def render_eval_script(profile: ClusterProfile, job: EvalJob) -> str:
    """A job array script (SLURM) or, for the local profile, a script that reads SLURM_ARRAY_TASK_ID too."""
    n = len(job.checkpoints)
    lines = ["#!/bin/bash"]
    if profile.executor == "slurm":
        array = f"0-{n - 1}" + (f"%{job.max_parallel}" if job.max_parallel else "")
        params: list[tuple[str, object]] = [
            ("job-name", job.name),
            ("nodes", 1),
            ("ntasks-per-node", 1),
            ("time", job.time),
            ("array", array),
            ("output", f"{job.log_dir}/%x-%A_%a.out"),
            ("open-mode", "append"),
        ]
        lines += sbatch_lines(_single_task(profile), params)
    lines += preamble(profile, job.workdir, what="recpre evaluation job array")
    lines += ["", "# environment", *environment_lines(profile, [("PYTHONUNBUFFERED", "1")])]
    lines += ["", "# one checkpoint per array task", "CHECKPOINTS=("]
    lines += [f"  {q(c)}" for c in job.checkpoints]
    lines += [")", 'CHECKPOINT="${CHECKPOINTS[${SLURM_ARRAY_TASK_ID:-0}]}"', 'echo "evaluating $CHECKPOINT"']
    one_task = _single_task(profile)
    cmd = launch_line(one_task, [EVAL_SCRIPT, "--checkpoint", _PLACEHOLDER, *job.extra_args])
    lines += ["", "# launch", cmd.replace(_PLACEHOLDER, '"$CHECKPOINT"')]
    return "\n".join(lines) + "\n"


_WHOLE_NODE = ("gpus", "gpus-per-node", "gpus-per-task", "gres", "exclusive", "mem")


def _single_task(profile: ClusterProfile) -> ClusterProfile:
    """Evaluation is one process on one device: ask for one GPU (if the profile has GPUs), not a whole node."""
    sbatch = {k: v for k, v in profile.sbatch.items() if k not in _WHOLE_NODE}
    if any(k.startswith("gpu") for k in profile.sbatch):
        sbatch["gpus-per-node"] = 1
    return replace(profile, launch="task-per-device", devices_per_node=1, sbatch=sbatch)
