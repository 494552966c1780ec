"""Guardrails of a training run: a loss-spike stop, the abort error, and a test hook that injects NaN gradients."""

from __future__ import annotations

import math
import os
from typing import Any

from torch import nn

# Test hook: comma-separated optimizer steps (1-based, as in metrics.jsonl) whose gradients are replaced
# by NaN after the all-reduce, to exercise the non-finite-step path end to end.
DEBUG_NAN_STEPS_ENV = "RECPRE_DEBUG_NAN_STEPS"


class TrainingAborted(RuntimeError):
    """The run stopped itself (non-finite gradients, loss spike): not bad input, so exit code 1."""


def debug_nan_steps() -> frozenset[int]:
    raw = os.environ.get(DEBUG_NAN_STEPS_ENV, "").strip()
    return frozenset(int(x) for x in raw.split(",") if x.strip()) if raw else frozenset()


def poison_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
            return


class LossSpikeGuard:
    """Stops a run whose loss stays above `factor` x its running mean for `patience` steps in a row.

    The running mean is an exponential moving average of finite step losses, updated only with losses that
    are not spikes (so a blow-up cannot drag the reference up with it); the first `warmup` steps only feed it.
    """

    def __init__(self, factor: float | None, patience: int, beta: float = 0.95, warmup: int = 20) -> None:
        self.factor, self.patience, self.beta, self.warmup = factor, max(patience, 1), beta, warmup
        self.mean: float | None = None
        self.seen = 0
        self.in_a_row = 0

    def update(self, loss: float) -> bool:
        """Feed one step's loss; True when the run should stop."""
        if self.factor is None or not math.isfinite(loss):
            return False
        spike = self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean
        if spike:
            self.in_a_row += 1
            return self.in_a_row >= self.patience
        self.in_a_row = 0
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "seen": self.seen, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.seen, self.in_a_row = state["mean"], state["seen"], state["in_a_row"]
