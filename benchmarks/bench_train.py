"""Driver overhead: tokens/s of train.py against a bare PyTorch loop on the same model, batch and depths.

    python benchmarks/bench_train.py                       # debug config on CPU, markdown table on stdout
    python benchmarks/bench_train.py --steps 40 --repeats 3 --out benchmarks/results/DATE_cpu_train.md
    python benchmarks/bench_train.py fabric.device=cuda fabric.precision=bf16-mixed   # GPU: adds MFU

Both loops run the same optimizer steps: same model and settings, the same micro-batches per step and the same
sampled depth (n, k) per micro-step. The bare loop feeds pre-made random token batches (no data loader,
logging, validation, checkpoints or guardrails); train.py runs as users run it, with validation and
checkpoint intervals off. Step times are taken between consecutive steps (everything the driver does counts),
after `--warmup` steps, on two clocks: wall time, and the CPU time of the main thread (robust on a machine
shared with other work; run with OMP_NUM_THREADS=1 so all compute is on that thread). Runs alternate; the
median of `--repeats` is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recpre.flops import device_peak, mfu, training_flops_per_token  # noqa: E402
from recpre.settings import load_settings, model_config  # noqa: E402

LOOPS = ("bare", "train.py")
CLOCKS = ("wall", "main-thread CPU")


def load_driver():
    spec = importlib.util.spec_from_file_location("recpre_train_driver", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _intervals(stamps: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(wall seconds, main-thread CPU seconds) between consecutive stamps."""
    pairs = list(zip(stamps, stamps[1:]))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def driver_step_times(driver, overrides: list[str], run_dir: Path) -> tuple[list[float], list[float]]:
    """Wall and main-thread CPU seconds between consecutive optimizer steps of train.py (one Monitor.train each)."""
    from recpre.monitor import Monitor

    stamps: list[tuple[float, float]] = []
    original = Monitor.train

    def stamped(self, row, **kw):
        stamps.append(_stamp())
        original(self, row, **kw)

    Monitor.train = stamped
    try:
        rc = driver.main([*overrides, f"run.out_dir={run_dir}", "run.resume=never"])
        if rc != 0:
            raise SystemExit(f"train.py exited with {rc}")
    finally:
        Monitor.train = original
    return _intervals(stamps)


def bare_step_times(settings, steps: int) -> tuple[list[float], list[float], float]:
    """The same steps as a plain loop: wall and main-thread CPU step times, and FLOPs per step."""
    from recpre.model import build_model
    from recpre.optim import build_optimizer
    from recpre.recurrence import sample_depth

    config = model_config(settings)
    device = torch.device("cuda" if settings.fabric.device == "cuda" else "cpu")
    tr = settings.train
    accum = tr.world_batch_size // tr.micro_batch_size
    torch.manual_seed(settings.run.seed)
    model = build_model(config).to(device)
    if settings.fabric.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    optimizer = build_optimizer(model, settings.optim)
    autocast = settings.fabric.precision == "bf16-mixed"
    gen = torch.Generator().manual_seed(0)
    shape = (tr.micro_batch_size, config.block_size)
    batches = [
        (
            torch.randint(0, config.vocab_size, shape, generator=gen),
            torch.randint(0, config.vocab_size, shape, generator=gen),
        )
        for _ in range(accum)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    clip = tr.grad_clip if tr.grad_clip > 0 else math.inf
    stamps, flops, micro = [], 0.0, 0
    for _ in range(steps):
        for input_ids, labels in batches:
            n, k = sample_depth(config, micro, 0, settings.run.seed)
            micro += 1
            input_ids, labels = input_ids.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids, labels, num_steps=(n, k), loss_normalizer=float(labels.numel()))
            out.loss.backward()
            flops += training_flops_per_token(config, n, k) * input_ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if math.isfinite(grad_norm.item()):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ = out.loss.item()
        stamps.append(_stamp())
    return (*_intervals(stamps), flops / steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config (default launch_configs/debug.yaml)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("overrides", nargs="*", help="settings overrides, e.g. fabric.device=cuda")
    args = parser.parse_args(argv)

    overrides = [
        *args.overrides,
        f"train.max_steps={args.steps}",
        "train.max_tokens=null",
        "schedule.warmup_steps=0",
        "schedule.cooldown_steps=0",
        "eval.interval=0",
        "checkpoint.interval=0",
        "log.progress=none",
        "log.plot=false",
    ]
    if args.config:
        overrides = ["--config", args.config, *overrides]
    settings = load_settings(args.config, overrides[2:] if args.config else overrides)
    config = model_config(settings)
    tokens_per_step = settings.train.world_batch_size * config.block_size
    driver = load_driver()
    timed = args.steps - 1 - args.warmup  # step intervals after the warm-up
    if timed < 1:
        raise SystemExit("--steps must exceed --warmup + 1")
    runs: dict[tuple[str, str], list[float]] = {(loop, clock): [] for loop in LOOPS for clock in CLOCKS}
    step_flops = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            wall, cpu, step_flops = bare_step_times(settings, args.steps)
            results = {"bare": (wall, cpu), "train.py": driver_step_times(driver, overrides, Path(tmp) / f"run{r}")}
            for loop, (wall, cpu) in results.items():
                for clock, times in zip(CLOCKS, (wall, cpu)):
                    runs[loop, clock].append(tokens_per_step * timed / sum(times[args.warmup :]))
            print(
                f"repeat {r}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.0f} tok/s" for k, v in runs.items()),
                file=sys.stderr,
            )

    device = torch.device("cuda" if settings.fabric.device == "cuda" else "cpu")
    device_name, peak = device_peak(device)
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"# train.py driver overhead ({time.strftime('%Y-%m-%d')}, {device_name}, {settings.fabric.precision})",
        "",
        f"Model `{config.name}` ({config.num_params() / 1e6:.2f}M params, block {config.block_size}), "
        f"{settings.train.world_batch_size} sequences/step as "
        f"{settings.train.world_batch_size // settings.train.micro_batch_size} x {settings.train.micro_batch_size}, "
        f"the same sampled depths in both loops; {args.steps} steps per run, first {args.warmup} intervals not "
        f"timed; median of {args.repeats} alternating runs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads. `wall` is wall-clock time between steps; `main-thread CPU` is "
        "the CPU time of the thread that runs the loop (insensitive to other processes on a shared machine; "
        "the data loader's prefetch thread is not in it, as it overlaps the step on another core).",
        "",
        "| loop | clock | tokens/s | runs (tokens/s) | MFU (datasheet) | MFU (measured peak) |",
        "|---|---|---|---|---|---|",
    ]
    overhead = {}
    for clock in CLOCKS:
        for loop in LOOPS:
            tps = statistics.median(runs[loop, clock])
            mfu_d, mfu_m = mfu(step_flops * tps / tokens_per_step, peak)
            values = ", ".join(f"{x:,.0f}" for x in runs[loop, clock])
            lines.append(f"| {loop} | {clock} | {tps:,.0f} | {values} | {fmt(mfu_d)} | {fmt(mfu_m)} |")
        overhead[clock] = 1.0 - statistics.median(runs["train.py", clock]) / statistics.median(runs["bare", clock])
    lines += [
        "",
        "Driver overhead (1 - train.py / bare): "
        + ", ".join(f"{clock} **{100 * v:.1f}%**" for clock, v in overhead.items())
        + " (budget: < 5% on CPU).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    from report import emit_figures  # benchmarks/report.py: the line run_all.py collects

    figures = [
        {"name": f"{loop} tokens/s ({clock})", "value": round(statistics.median(runs[loop, clock]), 1), "unit": "tok/s"}
        for clock in CLOCKS
        for loop in LOOPS
    ]
    figures += [
        {"name": f"driver overhead ({c})", "value": round(100 * v, 1), "unit": "%"} for c, v in overhead.items()
    ]
    emit_figures("train", figures)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
