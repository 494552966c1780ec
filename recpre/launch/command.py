"""The `launchers/submit.py` command: arguments -> profile + job -> script -> dry-run print or submission."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from recpre.errors import UserError, run_command
from recpre.launch.eval_array import EvalJob, check_checkpoints, render_eval_script
from recpre.launch.executor import JobFailed, submit_scripts, write_script
from recpre.launch.profile import ClusterProfile, available_profiles, check_time, load_profile
from recpre.launch.script import TrainJob, precompile_job, render_precompile_script, render_train_script
from recpre.launch.secrets import check_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Submit a training run (or evaluation over checkpoints) to a cluster described by a profile.",
        epilog=f"profiles in launchers/clusters/: {', '.join(available_profiles())}",
    )
    p.add_argument("--cluster", required=True, help="profile name (launchers/clusters/NAME.yaml) or a profile file")
    p.add_argument("--config", help="run config YAML (default: launch_configs/debug.yaml)")
    p.add_argument("--nodes", type=int, help="number of nodes (default: the profile's)")
    p.add_argument("--time", help="time limit per job segment, e.g. 12:00:00 (default: the profile's)")
    p.add_argument("--name", help="job name (default: run.name)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script(s) and submit nothing")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None, help="Neuron pre-compile job")
    p.add_argument("--no-memory-check", action="store_true", help="submit even when the memory plan does not fit")
    p.add_argument("--no-wait", action="store_true", help="local profile: return after submitting")
    p.add_argument("--eval", nargs="+", metavar="CHECKPOINT", help="evaluate these checkpoints as a job array")
    p.add_argument("--eval-out", help="folder for evaluation job logs (default: runs/eval-jobs)")
    p.add_argument("overrides", nargs="*", help="settings overrides key=value (train) or evaluate/run.py args (eval)")
    return p


def _job_name(text: str) -> str:
    return _NAME.sub("-", text).strip("-") or "recpre"


def plan_train(args: argparse.Namespace, profile: ClusterProfile, cwd: Path) -> TrainJob:
    """Validate the run config now (before anything queues) and pin the run folder to an absolute path."""
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
    check_overrides(args.overrides)
    from recpre.settings import load_settings

    config = None
    if args.config:
        path = Path(args.config)
        path = path if path.is_absolute() else cwd / path
        if not path.is_file():
            raise UserError(f"config file {args.config} does not exist; check --config")
        config = str(path.resolve())
    settings = load_settings(config, list(args.overrides))
    out_dir = Path(settings.run.out_dir)
    out_dir = out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir
    overrides = [o for o in args.overrides if not o.startswith("run.out_dir=")]
    overrides.append(f"run.out_dir={out_dir}")
    if not any(o.startswith("run.resume=") for o in overrides) and settings.run.resume != "auto":
        print(
            f"note: run.resume is {settings.run.resume!r}; a requeued job will not continue from its checkpoint",
            file=sys.stderr,
        )
    nodes = args.nodes if args.nodes is not None else profile.nodes
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    if profile.executor == "local" and nodes != 1:
        raise UserError(f"cluster profile {profile.name} runs on this machine only; use --nodes 1")
    time_limit = check_time(args.time, "--time") if args.time else profile.time
    return TrainJob(
        name=_job_name(args.name or settings.run.name),
        workdir=REPO_ROOT,
        config=config,
        overrides=overrides,
        out_dir=out_dir,
        nodes=nodes,
        time=time_limit,
    )


def _print_scripts(scripts: list[tuple[str, str]]) -> None:
    for i, (title, text) in enumerate(scripts):
        if len(scripts) > 1:
            print(("\n" if i else "") + f"# ===== {title} =====")
        sys.stdout.write(text)


def check_memory(job: TrainJob, profile: ClusterProfile, skip: bool) -> None:
    """Refuse (exit 2, the planner's sentence) a job whose memory plan exceeds the profile's device memory;
    with --no-memory-check the job's own start-up check is skipped too."""
    if skip:
        job.flags.append("--no-memory-check")
        return
    if profile.device_memory_gib is None:
        return
    from recpre.memory_plan import PlanInputs, check_fits
    from recpre.settings import load_settings

    ranks = job.nodes * profile.devices_per_node
    inputs = PlanInputs.from_settings(load_settings(job.config, job.overrides), ranks, profile.devices_per_node)
    check_fits(inputs, profile.device_memory_gib)


def run_train(args: argparse.Namespace, profile: ClusterProfile, cwd: Path) -> int:
    job = plan_train(args, profile, cwd)
    check_memory(job, profile, args.no_memory_check)
    precompile = profile.precompile.enabled if args.precompile is None else args.precompile
    if precompile and profile.executor != "slurm":
        raise UserError(f"--precompile needs a SLURM profile; {profile.name} is local")
    scripts: list[tuple[str, str]] = []
    if precompile:
        scripts.append(("pre-compile job (the run waits for it: sbatch --dependency=afterok)", ""))
        scripts[-1] = (scripts[-1][0], render_precompile_script(profile, job))
    scripts.append(("training job", render_train_script(profile, job)))
    if args.dry_run:
        _print_scripts(scripts)
        return 0
    dependency = None
    if precompile:
        pre = precompile_job(profile, job)
        pre.log_dir.mkdir(parents=True, exist_ok=True)
        path = write_script(scripts[0][1], pre.log_dir, "precompile")
        (first,) = submit_scripts(profile, [(path, {})], log_dir=pre.log_dir, time_limit=pre.time, name=pre.name)
        dependency = first.job_id
        print(f"submitted pre-compile job {first.job_id}: {path}")
    path = write_script(scripts[-1][1], job.log_dir, "train")
    (sub,) = submit_scripts(
        profile, [(path, {})], log_dir=job.log_dir, time_limit=job.time, name=job.name, dependency=dependency
    )
    print(f"submitted job {sub.job_id}: {path}")
    print(f"job log: {sub.log or job.log_dir / f'{job.name}-{sub.job_id}.out'}")
    print(f"run folder: {job.out_dir}")
    if profile.executor == "local" and not args.no_wait:
        sub.wait()
        print(f"job {sub.job_id} finished")
    return 0


def run_eval(args: argparse.Namespace, profile: ClusterProfile, cwd: Path) -> int:
    checkpoints = check_checkpoints(args.eval, cwd)
    if args.config or args.nodes:
        raise UserError("--eval takes checkpoints and evaluate/run.py arguments; drop --config/--nodes")
    check_overrides(args.overrides)
    log_dir = Path(args.eval_out) if args.eval_out else REPO_ROOT / "runs" / "eval-jobs"
    log_dir = (log_dir if log_dir.is_absolute() else cwd / log_dir).resolve()
    job = EvalJob(
        name=_job_name(args.name or "recpre-eval"),
        workdir=REPO_ROOT,
        checkpoints=checkpoints,
        log_dir=log_dir,
        time=check_time(args.time, "--time") if args.time else profile.time,
        extra_args=list(args.overrides),
    )
    text = render_eval_script(profile, job)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    path = write_script(text, log_dir, "eval")
    if profile.executor == "slurm":
        tasks = [(path, {})]
    else:
        tasks = [(path, {"SLURM_ARRAY_TASK_ID": str(i)}) for i in range(len(checkpoints))]
    subs = submit_scripts(profile, tasks, log_dir=log_dir, time_limit=job.time, name=job.name)
    for sub in subs:
        print(f"submitted evaluation job {sub.job_id}: {path}")
    if profile.executor == "local" and not args.no_wait:
        for sub in subs:
            sub.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`recpre-submit` / `launchers/submit.py`: exit code 2 with one line for bad input, 1 for a failed job."""
    return run_command(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cwd = Path.cwd()
    profile = load_profile(args.cluster)
    try:
        if args.eval is not None:
            return run_eval(args, profile, cwd)
        return run_train(args, profile, cwd)
    except JobFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
