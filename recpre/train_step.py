"""One optimizer step: micro-batches with gradient accumulation, gradient reduction, clip, skip, update.

`train_step` is the whole step and returns its metrics; the loop around it (train.py) owns the schedule,
logging, validation, checkpoint cadence and stops. What differs between execution engines (eager, XLA) is the
`StepBackend` the trainer holds (recpre/step_backends.py), so nothing here branches on where it runs.

The loss is a sum over all target tokens of all micro-batches on all ranks divided by their global count, so
accumulation and the number of ranks do not change it. Global micro-batch g of a step (rank r's i-th is
g = first + r + world_size * i, the loader's dealing order) keys the depth draw and the initial-state noise,
which makes a step's computation independent of how its micro-batches are spread over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recpre.data.documents import document_ids, document_position_ids
from recpre.flops import training_flops_per_token
from recpre.guardrails import poison_gradients
from recpre.ops import IGNORE_INDEX
from recpre.recurrence import RecurrencePolicy, noise_seed
from recpre.train_state import TrainState

TRAIN_NOISE_KEY, REPLICATED_NOISE_KEY = 0, 2


def model_inputs(
    input_ids: torch.Tensor, *, eos_id: int | None = None, document_mask: bool = False, reset_position_ids: bool = False
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
    return int(sum(int((lab != IGNORE_INDEX).sum()) for lab in labels))


@dataclass
class Trainer:
    """Everything one optimizer step touches, assembled once by the driver."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    fabric: Any
    backend: Any  # a recpre.step_backends.StepBackend
    config: Any  # ModelConfig: FLOPs per token
    recurrence: RecurrencePolicy | None
    seed: int
    grad_clip: float = math.inf
    input_kwargs: dict[str, Any] = field(default_factory=dict)
    nan_steps: frozenset[int] = frozenset()  # test hook (recpre.guardrails.debug_nan_steps)
    report_memory: bool = True  # the memory event of the first step (recpre/memory.py)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def take_memory_report(self) -> dict[str, Any] | None:
        """The fabric's memory report, once (the backend calls it while gradients and optimizer state exist)."""
        if not self.report_memory:
            return None
        self.report_memory = False
        return self.fabric.memory_report(self.model, self.optimizer)

    def micro_depth(self, step: int, micro_batch: int, index: int) -> tuple[int, int] | None:
        """(n, k) of one micro-batch (None for a model without recurrence), as the backend runs it."""
        if self.recurrence is None:
            return None
        n, k = self.recurrence.depth(step, micro_batch, self.seed)
        return self.backend.training_depth(self.recurrence.spec_at(step), n, k, index)

    def noise_key(self, step: int, micro_batch: int, index: int) -> int:
        """Seed of the initial-state noise: per global micro-batch, or (the reference's behaviour) the same
        stream on every rank, keyed by the rank-local index."""
        if self.recurrence is not None and self.recurrence.state_noise == "rank-replicated":
            return noise_seed(self.seed, REPLICATED_NOISE_KEY, step, index)
        return noise_seed(self.seed, TRAIN_NOISE_KEY, micro_batch)


def train_step(trainer: Trainer, state: TrainState, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; updates `state` and returns the step's metrics."""
    t, fabric, model = trainer, trainer.fabric, trainer.model
    normalizer = fabric.loss_normalizer(count_targets([labels for _, labels in micro]))
    loss_sum = torch.zeros((), device=fabric.device)
    flops, depth, first = 0.0, None, state.micro_batches
    for i, (input_ids, labels) in enumerate(micro):
        g = first + fabric.rank + fabric.world_size * i
        depth = t.micro_depth(state.step, g, state.micro_batches + i)
        t.backend.seed_noise(t.noise_key(state.step, g, i))
        input_ids = input_ids.to(fabric.device, non_blocking=True)
        labels = labels.to(fabric.device, non_blocking=True)
        with fabric.no_sync(model, enabled=i < len(micro) - 1), fabric.autocast():
            out = model(
                input_ids,
                labels,
                num_steps=depth,
                loss_normalizer=normalizer,
                **model_inputs(input_ids, **t.input_kwargs),
            )
        out.loss.backward()
        loss_sum += out.loss.detach()
        flops += training_flops_per_token(t.config, *(depth or (0, 0))) * input_ids.numel()
    state.micro_batches += fabric.world_size * len(micro)
    fabric.all_reduce_gradients(model)
    if state.step + 1 in t.nan_steps:
        poison_gradients(model)
    loss, grad_norm, memory = t.backend.finish_step(t, loss_sum)
    tokens = fabric.world_size * sum(x.numel() for x, _ in micro)
    state.record_step(tokens, finite=math.isfinite(grad_norm))
    return {
        "memory": memory,
        "loss": loss,
        "grad_norm": grad_norm,
        "accum": len(micro),
        "depth": list(depth) if depth is not None else None,
        "flops": flops * fabric.world_size,
        "step_tokens": tokens,
        **t.backend.metrics(),
    }
