"""Run every benchmark at one scale and write one report, benchmarks/results/<date>_<device>.md.

    python benchmarks/run_all.py --quick            # CPU: every bench at minutes scale (< 15 min on 2 cores)
    python benchmarks/run_all.py --full             # GPU machine: the figures that matter (H100/H200)
    python benchmarks/run_all.py --quick --list     # print the commands, run nothing
    python benchmarks/run_all.py --quick --only train,mfu --timeout-s 300

Each `benchmarks/bench_*.py` (plus `scaling_model.py`) runs in its own process. A script whose source has a
`--quick` flag gets `--quick` / `--full`; older scripts get the arguments in `ARGS` below, which map the two
scales onto their own flags. Figures come from BENCH_FIGURES lines and markdown tables on stdout (report.py).
A failed or timed-out bench is recorded as such in the report; the others still run. Exit status 1 when any
bench failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from report import BenchResult, environment, parse_figures, render_report, report_path  # noqa: E402

from recpre.errors import UserError, run_cli  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SCALES = ("quick", "full")
EXTRA_SCRIPTS = ("scaling_model.py",)  # not named bench_*, run last

_GPU_TRAIN = ["fabric.device=cuda", "fabric.precision=bf16-mixed"]
_ONE_MICRO_BATCH = ["train.world_batch_size=4", "train.micro_batch_size=4"]  # quick: 1 micro-step per step

# Arguments per bench for scripts without their own --quick/--full (name = file name without bench_ / .py).
# quick: CPU minutes on a loaded 2-core machine; full: one GPU (bf16, production shapes).
ARGS: dict[str, dict[str, list[str]]] = {
    "data": {
        "quick": ["--seconds", "1", "--rows", "2048", "--pipeline-files", "30"],
        "full": ["--seconds", "5", "--rows", "16384", "--pipeline-files", "300"],
    },
    "attention": {
        "quick": ["--warmup", "1", "--repeats", "2"],
        "full": ["--gpu", "--warmup", "3", "--repeats", "10"],
    },
    "generate": {  # speed only: the depth part needs a trained checkpoint (--checkpoint)
        "quick": ["--part", "speed", "--batch", "1", "--prompt", "64", "--new", "16", "--reps", "2"],
        "full": ["--part", "speed", "--batch", "4", "--prompt", "256", "--new", "64", "--reps", "3"],
    },
    "loss": {
        "quick": ["--n", "2048", "--d", "256", "--v", "16384", "--reps", "2", "--impls", "naive,fused"],
        "full": ["--gpu", "--reps", "10"],
    },
    "allreduce": {
        "quick": ["--world", "2", "--chunk-mb", "16", "--buffers", "2", "--iters", "2", "--threads", "1"],
        "full": ["--world", "2", "--chunk-mb", "4", "16", "64", "--buffers", "1", "2", "--iters", "5"],
    },
    "train": {
        "quick": ["--steps", "6", "--warmup", "2", "--repeats", "1", *_ONE_MICRO_BATCH],
        "full": ["--steps", "40", "--warmup", "10", "--repeats", "3", *_GPU_TRAIN],
    },
}

DEFAULT_TIMEOUT_S = {"quick": 420, "full": 1800}


def bench_name(path: Path) -> str:
    return path.stem.removeprefix("bench_")


def discover(bench_dir: Path) -> list[Path]:
    """bench_*.py in name order, then the extra scripts that exist."""
    scripts = sorted(bench_dir.glob("bench_*.py"))
    return scripts + [bench_dir / s for s in EXTRA_SCRIPTS if (bench_dir / s).exists()]


def has_scale_flags(path: Path) -> bool:
    """Whether a script speaks the uniform interface (accepts --quick / --full)."""
    try:
        return '"--quick"' in path.read_text(encoding="utf-8")
    except OSError:
        return False


def bench_command(path: Path, scale: str) -> tuple[list[str], str]:
    """The command line for one bench at a scale, and a note when it is not the uniform interface."""
    name = bench_name(path)
    base = [sys.executable, str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)]
    if has_scale_flags(path):
        return [*base, f"--{scale}"], ""
    if name in ARGS:
        return [*base, *ARGS[name][scale]], ""
    return base, "no --quick/--full flag: ran with its defaults"


def run_bench(path: Path, scale: str, timeout_s: float) -> BenchResult:
    command, note = bench_command(path, scale)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "disabled")
    display = ["python", *command[1:]]
    start = time.perf_counter()
    # Own session, so a timeout ends the bench's children too (torchrun / mp.spawn workers), not only the script.
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return BenchResult(
            bench_name(path),
            display,
            "timeout",
            time.perf_counter() - start,
            None,
            stdout,
            stderr,
            note=f"killed after {timeout_s:.0f} s",
            figures=parse_figures(stdout),
        )
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    wall = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else "failed"
    if status == "failed":
        last = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        note = f"exit {proc.returncode}: {last[:200]}"
    return BenchResult(
        bench_name(path),
        display,
        status,
        wall,
        proc.returncode,
        stdout,
        stderr,
        note,
        parse_figures(stdout),
    )


def select(scripts: list[Path], only: str, skip: str) -> list[Path]:
    names = {bench_name(p): p for p in scripts}
    wanted = [n.strip() for n in only.split(",") if n.strip()] if only else list(names)
    dropped = {n.strip() for n in skip.split(",") if n.strip()}
    for n in [*wanted, *dropped]:
        if n not in names:
            raise UserError(f"--only/--skip: no bench named '{n}'; known: {', '.join(names)}.")
    return [names[n] for n in wanted if n not in dropped]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = p.add_mutually_exclusive_group(required=True)
    scale.add_argument("--quick", action="store_true", help="CPU scale: every bench in minutes")
    scale.add_argument("--full", action="store_true", help="GPU scale: bf16 production shapes (needs CUDA)")
    p.add_argument("--only", default="", help="comma list of bench names (e.g. train,mfu); default all")
    p.add_argument("--skip", default="", help="comma list of bench names to leave out")
    p.add_argument("--timeout-s", type=float, default=None, help="per bench (default 420 quick, 1800 full)")
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/<date>_<device>.md)")
    p.add_argument("--bench-dir", default=str(BENCH_DIR), help=argparse.SUPPRESS)  # tests point it at stubs
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    p.add_argument("--allow-cpu", action="store_true", help="let --full run without a GPU (to test the commands)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = "quick" if args.quick else "full"
    if args.timeout_s is not None and args.timeout_s <= 0:
        raise UserError(f"--timeout-s must be positive, got {args.timeout_s}.")
    scripts = select(discover(Path(args.bench_dir)), args.only, args.skip)
    if args.list:
        for path in scripts:
            command, note = bench_command(path, scale)
            print(shlex.join(["python", *command[1:]]) + (f"   # {note}" if note else ""))
        return 0
    if scale == "full" and not args.allow_cpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--full needs a CUDA GPU (none is visible); use --quick on a CPU machine.")
    timeout = args.timeout_s or DEFAULT_TIMEOUT_S[scale]
    env = environment()
    out = Path(args.out) if args.out else report_path(REPO / "benchmarks" / "results", env)
    start = time.perf_counter()
    results = []
    for path in scripts:
        print(f"[run_all] {bench_name(path)} ...", file=sys.stderr, flush=True)
        r = run_bench(path, scale, timeout)
        results.append(r)
        print(f"[run_all] {r.name}: {r.status} in {r.wall_s:.0f} s {r.note}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    notes = []
    if not env["gpus"]:
        notes.append(
            "No GPU on this machine: no GPU figures were taken. The GPU figures come from "
            "`python benchmarks/run_all.py --full` on an H100/H200 (docs/performance.md)."
        )
    if env.get("load") is not None and env["load"] > (os.cpu_count() or 1):
        notes.append(
            f"The machine was shared (load average {env['load']:.1f} on {os.cpu_count()} cores at the start): "
            "wall-clock figures are depressed and noisy; compare ratios within one bench, not absolute times."
        )
    command = shlex.join(["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    text = render_report(env, results, scale=scale, command=command, wall_s=wall, notes=notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"[run_all] wrote {out} ({wall / 60:.1f} min)", file=sys.stderr)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
