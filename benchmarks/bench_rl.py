"""GRPO rollouts: tokens/s of sampling with and without the KV cache, and the share of a GRPO step spent
generating (the rest: the old/reference log-probability forwards and the updates).

    python benchmarks/bench_rl.py --quick                                  # debug-recurrent, fresh init, CPU
    python benchmarks/bench_rl.py --checkpoint runs/sft-debug --steps 5    # the SFT'd debug model
    python benchmarks/bench_rl.py --full                                   # magpie-150m shape on a GPU

The rollout is the one `train.objective: grpo` samples (launch_configs/grpo-debug.yaml: a micro-batch of
prompts of the bundled task, each sampled rl.group_size times at temperature 1, here 16 new tokens (the config
stops at 4) and no stop strings, so every row decodes the same number of tokens; an override changes either).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from report import emit_figures  # noqa: E402

import recpre.rl.step as grpo_step  # noqa: E402
from recpre.fabric import SimpleFabric  # noqa: E402
from recpre.generation import generate_with_info  # noqa: E402
from recpre.settings import load_settings  # noqa: E402


def train_module():
    spec = importlib.util.spec_from_file_location("recpre_train_driver", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rollout_speed(run, reps: int) -> list[dict]:
    """Tokens/s of sampling one rollout micro-batch, cached and uncached (median of `reps`)."""
    rl = run.settings.rl
    model = run.fabric.unwrap(run.trainer.model)
    batch = run.loader.batch(0)
    prompts = [ids for ids in batch.ids for _ in range(rl.group_size)]
    depth = getattr(model.config, "mean_recurrence", None)
    rows = []
    for name, cache in (("kv cache", True), ("no cache", False)):
        times, tokens = [], 0
        for _ in range(reps):
            t0 = time.perf_counter()
            out = generate_with_info(model, prompts, max_new_tokens=rl.max_new_tokens, num_steps=depth,
                                     temperature=rl.temperature, seed=0, eos_id=-1, use_cache=cache)  # fmt: skip
            times.append(time.perf_counter() - t0)
            tokens = sum(len(t) for t in out.new_tokens)
        t = statistics.median(times)
        rows.append({"variant": name, "seconds": t, "tokens_per_s": tokens / t, "tokens": tokens})
    return rows


def step_share(run, steps: int) -> dict:
    """Seconds per GRPO step and the part of it spent in `collect_rollout` (sampling + rewards)."""
    spent = []
    original = grpo_step.collect_rollout

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    grpo_step.collect_rollout = timed
    totals, generating = [], []
    try:
        batches = iter(run.loader)
        for _ in range(steps):
            spent.clear()
            accum = run.plan.accumulation_steps_within(run.state.step, None, run.state.tokens)
            t0 = time.perf_counter()
            run.step_fn(run.trainer, run.state, [next(batches) for _ in range(accum)])
            totals.append(time.perf_counter() - t0)
            generating.append(sum(spent))
    finally:
        grpo_step.collect_rollout = original
    total, gen = statistics.median(totals), statistics.median(generating)
    return {"step_s": total, "generate_s": gen, "share": gen / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="initial weights (run.init_from); default a fresh init")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps timed (median)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="debug-recurrent on CPU, 2 steps")
    p.add_argument("--full", action="store_true", help="magpie-150m shape on one GPU, bf16-mixed")
    p.add_argument("overrides", nargs="*", help="settings overrides, e.g. rl.group_size=16")
    args = p.parse_args()
    overrides = [f"run.init_from={args.checkpoint}" if args.checkpoint else "run.init_from=null",
                 "rl.stop=[]", "rl.max_new_tokens=16", "eval.interval=0", "log.progress=none",
                 "log.plot=false"]  # fmt: skip
    if args.quick:
        args.steps, args.reps = 2, 1
    if args.full:
        overrides += ["model.name=magpie-150m", "fabric.device=cuda", "fabric.precision=bf16-mixed",
                      "data.tokenizer=null", "model.overrides.vocab_size=4096"]  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as out:
        settings = load_settings(REPO / "launch_configs" / "grpo-debug.yaml",
                                 [*overrides, f"run.out_dir={out}", *args.overrides])  # fmt: skip
        fabric = SimpleFabric(settings.fabric)
        fabric.launch()
        try:
            run = train_module().build_run(settings, fabric)
            speed = rollout_speed(run, args.reps)
            share = step_share(run, args.steps)
        finally:
            fabric.teardown()
    rl = settings.rl
    print(f"\nmodel {settings.model.name} | {settings.train.micro_batch_size} prompts x {rl.group_size} samples "
          f"x {rl.max_new_tokens} new tokens | {torch.get_num_threads()} threads | {fabric.device}\n")  # fmt: skip
    print("| rollout sampling | tokens/s | seconds |\n|---|---|---|")
    for row in speed:
        print(f"| {row['variant']} | {row['tokens_per_s']:.1f} | {row['seconds']:.2f} |")
    print(f"\n| GRPO step ({settings.train.world_batch_size} prompts) | seconds |\n|---|---|")
    print(f"| whole step | {share['step_s']:.2f} |\n| generating (sampling + rewards) | {share['generate_s']:.2f} |")
    print(f"| share generating | {100 * share['share']:.0f}% |")
    emit_figures("rl", [
        *({"name": f"rollout {r['variant']}", "value": round(r["tokens_per_s"], 1), "unit": "tok/s"} for r in speed),
        {"name": "GRPO step", "value": round(share["step_s"], 3), "unit": "s"},
        {"name": "share of step generating", "value": round(share["share"], 3), "unit": ""},
    ])  # fmt: skip


if __name__ == "__main__":
    main()
