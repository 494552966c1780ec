"""Held-out evaluation of a GRPO run: greedy pass@1 at the rollout depth and, for a recurrent model, the
pass rate at each depth of `rl.eval_depths` (plus adaptive exit when `rl.eval_adaptive`): how reward depends
on test-time depth. A completion passes when its reward is > 0.

The held-out prompts are dealt over ranks (rank r takes prompts r, r + W, ...) and the counts summed. The
initial-state noise is seeded per evaluation batch from the run seed inside a forked RNG, so the evaluations of
one run compare like with like and training's random streams are untouched (with `state_init: like-init` the
figures of another world size differ by that noise).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recpre.generation import AdaptiveDepth, generate_with_info
from recpre.recurrence import noise_seed
from recpre.rl.rewards import RewardFn, score
from recpre.rl.rollout import completion_text

EVAL_KEY = 0x6576616C  # "eval"
PLOT_FILE = "reward_by_depth.png"
BATCH = 32


@dataclass
class HeldOut:
    rows: list[dict]
    texts: list[str]
    ids: list[list[int]]


@torch.no_grad()
def sampled_pass_rate(
    model: Any, held_out: HeldOut, *, fabric: Any, rl: Any, tokenizer: Any, reward_fn: RewardFn, seed: int,
    num_steps: int | None,
) -> float:  # fmt: skip
    """Mean success of `rl.eval_samples` completions per held-out prompt sampled as rollouts are (pass@1
    estimated from n samples, as in the Codex paper), all ranks together; seeded per batch, like the greedy rate."""
    mine = list(range(fabric.rank, len(held_out.rows), fabric.world_size))
    n, counts = rl.eval_samples, torch.zeros(2, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(mine), max(1, BATCH // n)):
            picks = mine[start : start + max(1, BATCH // n)]
            batch_seed = noise_seed(seed, EVAL_KEY, picks[0], n)
            torch.manual_seed(batch_seed)
            out = generate_with_info(
                model, [held_out.ids[i] for i in picks for _ in range(n)], max_new_tokens=rl.max_new_tokens,
                num_steps=num_steps, temperature=rl.temperature, top_p=rl.top_p, seed=batch_seed,
                eos_id=tokenizer.eos_id, stop=list(rl.stop) or None, decode=tokenizer.decode,
            )  # fmt: skip
            for j, tokens in enumerate(out.new_tokens):
                i = picks[j // n]
                text = completion_text(tokens, tokenizer.eos_id, tokenizer.decode)
                counts[0] += score(reward_fn, held_out.texts[i], text, held_out.rows[i]) > 0
            counts[1] += len(picks) * n
    counts = fabric.all_reduce(counts.to(fabric.device), op="sum").cpu()
    return float(counts[0] / counts[1].clamp(min=1))


@torch.no_grad()
def pass_rate(
    model: Any, held_out: HeldOut, *, fabric: Any, rl: Any, tokenizer: Any, reward_fn: RewardFn, seed: int,
    num_steps: int | None, adaptive: AdaptiveDepth | None = None,
) -> float:  # fmt: skip
    """Fraction of held-out prompts whose greedy completion earns a reward > 0 (all ranks together)."""
    mine = list(range(fabric.rank, len(held_out.rows), fabric.world_size))
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(mine), BATCH):
            picks = mine[start : start + BATCH]
            torch.manual_seed(noise_seed(seed, EVAL_KEY, picks[0]))
            out = generate_with_info(
                model, [held_out.ids[i] for i in picks], max_new_tokens=rl.max_new_tokens, num_steps=num_steps,
                temperature=0.0, eos_id=tokenizer.eos_id, stop=list(rl.stop) or None, decode=tokenizer.decode,
                adaptive=adaptive,
            )  # fmt: skip
            for i, tokens in zip(picks, out.new_tokens, strict=True):
                text = completion_text(tokens, tokenizer.eos_id, tokenizer.decode)
                counts[0] += score(reward_fn, held_out.texts[i], text, held_out.rows[i]) > 0
            counts[1] += len(picks)
    counts = fabric.all_reduce(counts.to(fabric.device), op="sum").cpu()
    return float(counts[0] / counts[1].clamp(min=1))


def evaluation_row(
    model: Any, held_out: HeldOut, *, fabric: Any, rl: Any, tokenizer: Any, reward_fn: RewardFn, seed: int,
    rollout_depth: int | None, recurrent: bool,
) -> dict[str, float]:  # fmt: skip
    """{"pass_at_1": greedy, at the rollout depth; "sampled_pass_at_1" (rl.eval_samples > 0); "reward_depth_<d>"
    per evaluation depth; "reward_adaptive"}."""
    kwargs = dict(fabric=fabric, rl=rl, tokenizer=tokenizer, reward_fn=reward_fn, seed=seed)
    row: dict[str, float] = {}
    if rl.eval_samples:
        row["sampled_pass_at_1"] = sampled_pass_rate(model, held_out, num_steps=rollout_depth, **kwargs)
    if recurrent:
        for d in sorted(set(rl.eval_depths) | {rollout_depth}):
            row[f"reward_depth_{d}"] = pass_rate(model, held_out, num_steps=d, **kwargs)
        if rl.eval_adaptive:
            adaptive = AdaptiveDepth()
            row["reward_adaptive"] = pass_rate(model, held_out, num_steps=max(rl.eval_depths), adaptive=adaptive,
                                               **kwargs)  # fmt: skip
        return {"pass_at_1": row[f"reward_depth_{rollout_depth}"], **row}
    return {"pass_at_1": pass_rate(model, held_out, num_steps=None, **kwargs), **row}


def plot_reward_by_depth(rows: list[dict[str, Any]], out_path: Path) -> Path | None:
    """Held-out pass rate per depth against the step, as a PNG (atomic); None without matplotlib or rows."""
    series = sorted(
        {k for r in rows for k in r if k.startswith("reward_depth_") or k == "reward_adaptive"},
        key=lambda k: (k == "reward_adaptive", int(k.rsplit("_", 1)[-1]) if k[-1].isdigit() else 0),
    )
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in series or ["pass_at_1"]:
        points = [(r["step"], r[key]) for r in rows if key in r]
        label = key.replace("reward_depth_", "depth ").replace("reward_", "")
        ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out pass@1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".png", dir=out_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out_path
