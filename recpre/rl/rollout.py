"""Rollouts: a group of sampled completions per prompt with recpre's KV-cached generation, their rewards, and
the token layout the update's forward reads.

A rollout is a pure function of the weights, its prompts, its depth and one seed: the seed drives both the
sampler and the initial-state noise of the recurrent model while decoding. Seeds come from `RolloutRng`, a
per-rank generator saved in every checkpoint, so a resumed run draws the rollouts the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recpre.generation import generate_with_info
from recpre.recurrence import noise_seed
from recpre.rl.prompts import PromptBatch
from recpre.rl.rewards import RewardFn, score

ROLLOUT_KEY = 0x726F6C6C  # "roll"


class RolloutRng:
    """The generator rollout seeds are drawn from (one per rank, part of the checkpoint)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(noise_seed(seed, ROLLOUT_KEY, rank))

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class Rollout:
    """`group_size` completions of each prompt of a batch, group-major (prompt j's are rows j*G .. j*G+G-1)."""

    batch: PromptBatch
    depth: tuple[int, int] | None  # (no-grad, grad) iterations: decoding ran n + k, the update runs (n, k)
    seed: int
    completions: list[list[int]]
    texts: list[str]
    rewards: Tensor  # [N]
    inputs: Tensor  # [N, L]: prompt + completion, right padded, without the last token
    targets: Tensor  # [N, L]: the next token of each position
    mask: Tensor  # [N, L] bool: the target is a completion token

    @property
    def completion_tokens(self) -> int:
        return int(self.mask.sum())


@torch.no_grad()
def sample_completions(
    model: Any,
    batch: PromptBatch,
    *,
    group_size: int,
    depth: tuple[int, int] | None,
    seed: int,
    rl: Any,
    eos_id: int | None,
    decode: Callable[[list[int]], str],
) -> list[list[int]]:
    """New tokens of `group_size` samples per prompt (the end-of-turn token kept), decoded with the KV cache."""
    prompts = [ids for ids in batch.ids for _ in range(group_size)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the recurrent model's initial-state noise while decoding
        out = generate_with_info(
            model,
            prompts,
            max_new_tokens=rl.max_new_tokens,
            num_steps=None if depth is None else sum(depth),
            temperature=rl.temperature,
            top_p=rl.top_p,
            seed=seed,
            eos_id=eos_id,
            stop=list(rl.stop) or None,
            decode=decode,
        )
    return out.new_tokens


def completion_text(tokens: list[int], eos_id: int | None, decode: Callable[[list[int]], str]) -> str:
    return decode(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)


def token_layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, mask) [N, L] for right-padded prompt + completion rows; positions start at 0 in every
    row, as they do when decoding a left-padded batch."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    seq = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq[b, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[b, len(p) - 1 : len(p) + len(c) - 1] = True  # position t predicts token t + 1
    return seq[:, :-1], seq[:, 1:], mask


def collect_rollout(
    model: Any,
    batch: PromptBatch,
    *,
    depth: tuple[int, int] | None,
    seed: int,
    rl: Any,
    tokenizer: Any,
    reward_fn: RewardFn,
) -> Rollout:
    """Sample, score and lay out one micro-batch's groups."""
    G, eos = rl.group_size, tokenizer.eos_id
    completions = sample_completions(
        model, batch, group_size=G, depth=depth, seed=seed, rl=rl, eos_id=eos, decode=tokenizer.decode
    )
    texts = [completion_text(c, eos, tokenizer.decode) for c in completions]
    rewards = [score(reward_fn, batch.texts[i // G], text, batch.rows[i // G]) for i, text in enumerate(texts)]
    prompts = [ids for ids in batch.ids for _ in range(G)]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    inputs, targets, mask = token_layout(prompts, completions, pad)
    return Rollout(batch, depth, seed, completions, texts, torch.tensor(rewards), inputs, targets, mask)
