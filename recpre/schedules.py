"""Learning-rate schedule and batch-size ramp: pure functions of the optimizer step.

Everything here depends only on the step index and the settings, so a resumed run recomputes the same
learning rate, the same number of accumulation steps and the same token count as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from recpre.errors import UserError
from recpre.settings import SCHEDULES


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    name: str = "trapezoid",
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Linear warmup from base_lr / warmup_steps up to base_lr, then:
    trapezoid: constant, then a linear cooldown to min_lr over the last `cooldown_steps` steps;
    cosine / linear: decay from base_lr to min_lr over the steps after warmup; constant: base_lr.
    The decaying schedules reach min_lr after the last step, so no step is spent at min_lr = 0.
    """
    if name not in SCHEDULES:
        raise UserError(f"schedule.name must be one of {', '.join(SCHEDULES)}, not {name!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if name == "constant":
        return base_lr
    if name == "trapezoid":
        start = max(total_steps - cooldown_steps, warmup_steps)
        if cooldown_steps <= 0 or step < start:
            return base_lr
        progress = (step - start) / max(total_steps - start, 1)
    else:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    progress = min(max(progress, 0.0), 1.0)
    if name == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr + (min_lr - base_lr) * progress


@dataclass(frozen=True)
class BatchPlan:
    """How many sequences each optimizer step consumes, with an optional linear batch-size ramp.

    The unit is one micro-batch on every rank (`micro_batch_size * world_size` sequences): the world batch
    is always a whole number of units, so accumulation steps are integers during the ramp too (rounded
    down, at least one). With a token budget the last step is shortened to the units that are left, so a
    run trains exactly `max_tokens` tokens whenever that is a whole number of units.
    """

    world_batch_size: int
    micro_batch_size: int
    world_size: int
    block_size: int
    ramp_steps: int = 0
    ramp_start_batch_size: int = 0

    def __post_init__(self) -> None:
        unit = self.unit_sequences
        if self.world_batch_size % unit:
            raise UserError(
                f"train.world_batch_size ({self.world_batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) times the number of ranks ({self.world_size}); change one of them"
            )

    @property
    def unit_sequences(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def unit_tokens(self) -> int:
        return self.unit_sequences * self.block_size

    def accumulation_steps(self, step: int) -> int:
        """Micro-batches per rank for optimizer step `step` (ignoring a token budget)."""
        full = self.world_batch_size // self.unit_sequences
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return full
        start = self.ramp_start_batch_size or self.unit_sequences
        sequences = start + (self.world_batch_size - start) * step / self.ramp_steps
        return min(max(int(sequences) // self.unit_sequences, 1), full)

    def tokens_in_step(self, step: int) -> int:
        return self.accumulation_steps(step) * self.unit_tokens

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step-1 (closed form after the ramp)."""
        ramp = min(step, max(self.ramp_steps, 0))
        return self._ramp_tokens(ramp) + (step - ramp) * self.tokens_in_step(max(self.ramp_steps, 0))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (the plan is frozen and lives as long as the run)
    def _ramp_tokens(self, steps: int) -> int:
        return sum(self.tokens_in_step(s) for s in range(steps))

    def total_steps(
        self, max_steps: int | None, max_tokens: int | None, *, start_step: int = 0, start_tokens: int | None = None
    ) -> int:
        """Number of optimizer steps: the first of max_steps and the step that exhausts max_tokens.

        A resumed run passes its counters (`start_step`, `start_tokens`): the tokens already trained may have
        come from another plan (a changed world_batch_size), so only the tokens left are spent under this one.
        """
        if max_steps is None and max_tokens is None:
            raise UserError("set train.max_steps or train.max_tokens so the run knows when to stop")
        steps = max_steps if max_steps is not None else math.inf
        if max_tokens is not None:
            if max_tokens < self.unit_tokens:
                raise UserError(
                    f"train.max_tokens ({max_tokens}) is less than one micro-batch on every rank "
                    f"({self.unit_tokens} tokens); raise it"
                )
            budget_steps = self._steps_for_tokens(max_tokens, start_step, start_tokens)
            steps = min(steps, budget_steps)
        return int(steps)

    def accumulation_steps_within(self, step: int, max_tokens: int | None, tokens: int | None = None) -> int:
        """Accumulation steps for `step`, shortened so the run never trains past `max_tokens`.

        `tokens` is what the run has trained so far (default: what this plan trains before `step`); a resumed
        run passes its own count, which differs when an earlier part ran with another batch size.
        """
        accum = self.accumulation_steps(step)
        if max_tokens is None:
            return accum
        done = self.tokens_before(step) if tokens is None else tokens
        left_units = (max_tokens - done) // self.unit_tokens
        return max(min(accum, left_units), 0)

    def _steps_for_tokens(self, max_tokens: int, start_step: int = 0, start_tokens: int | None = None) -> int:
        step = start_step
        tokens = self.tokens_before(start_step) if start_tokens is None else start_tokens
        while step < max(self.ramp_steps, 0):
            left_units = (max_tokens - tokens) // self.unit_tokens
            if left_units <= 0:
                return step
            tokens += min(self.accumulation_steps(step), left_units) * self.unit_tokens
            step += 1
        left_units = (max_tokens - tokens) // self.unit_tokens
        return step + math.ceil(max(left_units, 0) / self.accumulation_steps(step))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Scale every parameter group (Muon's too, which may have its own base rate) by lr / base_lr.

    Each group's own base rate is kept as "initial_lr" (the torch scheduler convention), so it is part of
    the optimizer state_dict and survives a resume.
    """
    scale = lr / base_lr if base_lr else 0.0
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * scale
