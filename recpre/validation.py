"""Validation at several recurrence depths over a fixed set of held-out batches, exact over tokens and ranks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recpre.ops import IGNORE_INDEX
from recpre.recurrence import noise_seed
from recpre.train_step import model_inputs

VAL_NOISE_KEY = 1  # keeps validation's initial-state noise apart from training's (recpre/train_step.py)


def eval_depths(config: Any, depths: list[int]) -> list[int]:
    """Validation depths: the configured ones plus the shape's mean recurrence, sorted, no repeats."""
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
    """Mean validation loss per depth over the same batches every time.

    Runs with k = 0 (all iterations forward-only). Each batch's initial-state noise is seeded by its global
    batch index (rank r's j-th batch is global batch r + world_size * j, as the loader deals them), inside a
    forked RNG: the result depends neither on the rank nor on the world size, and training's random stream is
    untouched. Returns val_loss (at the mean depth), val_loss_<d> for each depth, and val_ppl.
    """
    was_training = model.training
    model.eval()
    devices = [fabric.device] if fabric.device.type == "cuda" else []
    results: dict[str, float] = {}
    with torch.random.fork_rng(devices=devices):
        for depth in depths or [None]:
            total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
            for j, (input_ids, labels) in enumerate(batches):
                torch.manual_seed(noise_seed(seed, VAL_NOISE_KEY, fabric.rank + fabric.world_size * j))
                input_ids, labels = input_ids.to(fabric.device), labels.to(fabric.device)
                extra = model_inputs(input_ids, **input_kwargs)
                num_steps = None if depth is None else (depth, 0)
                with fabric.autocast():
                    out = model(input_ids, labels, num_steps=num_steps, loss_normalizer=1.0, **extra)
                total[0] += out.loss.double()
                total[1] += (labels != IGNORE_INDEX).sum()
            total = fabric.all_reduce(total, op="sum")
            loss = (total[0] / total[1].clamp(min=1)).item()
            results["val_loss" if depth is None else f"val_loss_{depth}"] = loss
    if depths:
        results["val_loss"] = results[f"val_loss_{mean_depth}"]
    results["val_ppl"] = math.exp(min(results["val_loss"], 50.0))
    model.train(was_training)
    return {"val_loss": results.pop("val_loss"), "val_ppl": results.pop("val_ppl"), **results}
