"""Pieces of the training loop that would hide the loop in train.py: learning-rate plumbing, guardrails,
validation at several depths, model inputs from a packed batch.

train.py keeps the loop itself readable top to bottom; everything here is a small, separately testable
function or class with checkpointable state.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from recpre.data.documents import document_ids, document_position_ids

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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Scale every parameter group (Muon's too, which may have its own base rate) by lr / base_lr.

    Each group's own base rate is kept as "initial_lr" (the torch scheduler convention), so it is part of
    the optimizer state_dict and survives a resume.
    """
    scale = lr / base_lr if base_lr else 0.0
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * scale


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


def model_inputs(
    input_ids: torch.Tensor, *, eos_id: int | None, document_mask: bool, reset_position_ids: bool
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the model beyond input_ids: document ids and per-document positions."""
    kwargs: dict[str, torch.Tensor] = {}
    if eos_id is None:
        return kwargs
    if document_mask:
        kwargs["doc_ids"] = document_ids(input_ids, eos_id)
    if reset_position_ids:
        kwargs["position_ids"] = document_position_ids(input_ids, eos_id)
    return kwargs


def count_targets(labels: list[torch.Tensor]) -> int:
    return int(sum(int((lab != -100).sum()) for lab in labels))


def eval_depths(config: Any, depths: list[int]) -> list[int]:
    """Validation depths: the configured ones plus the model's mean recurrence, sorted, no repeats."""
    if getattr(config, "architecture", "gpt") != "recurrent":
        return []
    return sorted({int(d) for d in depths} | {int(config.mean_recurrence)})


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    depths: list[int],
    mean_depth: int | None,
    fabric: Any,
    input_kwargs: dict[str, Any],
    seed: int,
) -> dict[str, float]:
    """Mean validation loss per depth over the same batches every time, exact over tokens and ranks.

    Runs with k = 0 (all iterations forward-only) inside a forked RNG seeded with `seed`, so that
    validation neither changes the training run's random stream nor varies between evaluations.
    Returns val_loss (at the mean depth), val_loss_<d> for each depth, and val_ppl.
    """
    was_training = model.training
    model.eval()
    devices = [fabric.device] if fabric.device.type == "cuda" else []
    results: dict[str, float] = {}
    with torch.random.fork_rng(devices=devices):
        for depth in depths or [None]:
            torch.manual_seed(seed)
            total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
            for input_ids, labels in batches:
                input_ids, labels = input_ids.to(fabric.device), labels.to(fabric.device)
                extra = model_inputs(input_ids, **input_kwargs)
                num_steps = None if depth is None else (depth, 0)
                with fabric.autocast():
                    out = model(input_ids, labels, num_steps=num_steps, loss_normalizer=1.0, **extra)
                total[0] += out.loss.double()
                total[1] += (labels != -100).sum()
            total = fabric.all_reduce(total, op="sum")
            loss = (total[0] / total[1].clamp(min=1)).item()
            if depth is None:
                results["val_loss"] = loss
            else:
                results[f"val_loss_{depth}"] = loss
    if depths:
        results["val_loss"] = results[f"val_loss_{mean_depth}"]
    results["val_ppl"] = math.exp(min(results["val_loss"], 50.0))
    model.train(was_training)
    return {"val_loss": results.pop("val_loss"), "val_ppl": results.pop("val_ppl"), **results}
