"""What differs between execution engines inside one optimizer step, behind one small interface chosen once
per run from `fabric.strategy`, so the driver's loop never branches on where it runs.

- `EagerStep` (CPU, CUDA/ROCm, MPS; every strategy from `single` to `fsdp`): the fabric clips over the global
  (possibly sharded) gradient norm, steps the (possibly sharded) optimizer, and gathers or scatters the full
  model and optimizer state for checkpoints; a non-finite step is skipped with an `if`.
- `XlaStep` (Trainium trn1 through torch-neuronx, TPU, XLA on CPU; recpre/xla.py): graph-stable recurrence (a
  cut after every no-grad iteration, a fixed number of grad iterations), clip and skip on the device by
  masking, values read after the step's graph is cut, weights and optimizer state moved to CPU for the files.
  With `sweep_depths` (`--compile-sweep`) it visits every graph a run needs and writes no checkpoint.

A native Neuron device or another engine adds a backend, not a branch in the loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recpre import xla as xla_helpers
from recpre.unwrap import unwrap_model


class EagerStep:
    """Eager execution: the reference behaviour every other backend must match."""

    name = "eager"
    saves_checkpoints = True

    def prepare(self, model: nn.Module, optimizer: Any) -> None:
        """Anything the engine needs before step 1 (nothing in eager mode)."""

    def training_depth(self, spec: Any, n: int, k: int, micro_step: int) -> tuple[int, int]:
        return n, k

    def seed_noise(self, seed: int) -> None:
        """Seed the generators the model's initial-state noise is drawn from."""
        torch.manual_seed(seed)

    def finish_step(self, trainer: Any, loss_sum: torch.Tensor) -> tuple[float, float, dict | None]:
        """Clip, update unless the gradient norm is non-finite, clear gradients: (mean loss, grad norm, the
        memory report on the trainer's first step, measured while gradients and optimizer state are held)."""
        fabric, optimizer = trainer.fabric, trainer.optimizer
        grad_norm = fabric.clip_grad_norm(trainer.model, trainer.params, trainer.grad_clip)
        loss = float(fabric.all_reduce(loss_sum, op="mean"))
        if math.isfinite(grad_norm):
            fabric.optimizer_step(optimizer)
        memory = trainer.take_memory_report()
        optimizer.zero_grad(set_to_none=True)
        fabric.sync()
        return loss, grad_norm, memory

    def metrics(self) -> dict[str, Any]:
        return {}

    def full_state(self, fabric: Any, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """{"model": weights, "optimizer": state} as one process holds them (complete on rank 0)."""
        return fabric.full_state_dict(model, optimizer)

    def load_weights(self, fabric: Any, model: nn.Module, path: Path) -> None:
        """Weights of a checkpoint file; a model the fabric has sharded takes them one tensor at a time."""
        from recpre.weights import load_initial_weights

        load_initial_weights(model, path, fabric=fabric)

    def load_optimizer(self, fabric: Any, model: nn.Module, optimizer: Any, saved: dict, source: str) -> None:
        fabric.load_full_state_dict(model, optimizer, {"optimizer": saved}, source=source)


class XlaStep(EagerStep):
    """PyTorch/XLA: a fixed set of compiled graphs whatever depth is sampled (recpre/xla.py)."""

    name = "xla"

    def __init__(self, config: Any, *, sweep_depths: list[int] | None = None) -> None:
        self.config, self.sweep = config, sweep_depths
        self.saves_checkpoints = not sweep_depths  # a sweep's weights are garbage under neuron_parallel_compile

    def prepare(self, model: nn.Module, optimizer: Any) -> None:
        """Optimizer state and weights in steady-state form, and a graph cut after every no-grad iteration."""
        xla_helpers.prepare_training(optimizer, [p for p in model.parameters() if p.requires_grad])
        plain = unwrap_model(model)
        if hasattr(plain, "set_recurrence_boundary"):
            plain.set_recurrence_boundary(xla_helpers.cut)

    def training_depth(self, spec: Any, n: int, k: int, micro_step: int) -> tuple[int, int]:
        n, k = xla_helpers.training_depth(spec, n, k)
        return xla_helpers.sweep_depth(micro_step, self.sweep) if self.sweep else (n, k)

    def seed_noise(self, seed: int) -> None:
        torch.manual_seed(seed)
        xla_helpers.seed_device(seed)

    def finish_step(self, trainer: Any, loss_sum: torch.Tensor) -> tuple[float, float, dict | None]:
        """Clip and skip on the device, then cut the graph and read the values (no host sync inside a step)."""
        fabric, optimizer = trainer.fabric, trainer.optimizer
        grad_norm_t = xla_helpers.masked_optimizer_step(optimizer, trainer.params, trainer.grad_clip)
        loss_t = fabric.all_reduce(loss_sum, op="mean")
        optimizer.zero_grad(set_to_none=True)
        fabric.sync()
        grad_norm, loss = float(grad_norm_t), float(loss_t)
        if not math.isfinite(grad_norm):
            xla_helpers.rewind_step_counters(optimizer, fabric.device)
        return loss, grad_norm, None

    def metrics(self) -> dict[str, Any]:
        return {"xla_graphs": xla_helpers.compile_count()}

    def full_state(self, fabric: Any, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        from recpre.model import build_model

        cpu = xla_helpers.cpu_module(model, build_model(self.config, device="meta"))
        return {"model": cpu, "optimizer": xla_helpers.to_cpu(optimizer.state_dict())}

    def load_weights(self, fabric: Any, model: nn.Module, path: Path) -> None:
        """safetensors reads into CPU weights, which are then copied onto the device."""
        from recpre.checkpoint import load_weights
        from recpre.model import build_model

        empty = build_model(self.config, device="meta")
        xla_helpers.load_through_cpu(model, empty, lambda m: load_weights(m, path))

    def load_optimizer(self, fabric: Any, model: nn.Module, optimizer: Any, saved: dict, source: str) -> None:
        from recpre.optim import load_optimizer_state

        load_optimizer_state(optimizer, saved, source=source)


def step_backend(strategy: str, config: Any, *, sweep_depths: list[int] | None = None) -> EagerStep:
    """The backend of a fabric strategy; `sweep_depths` (the backprop depths a run will use) makes the XLA
    backend a compile sweep."""
    return XlaStep(config, sweep_depths=sweep_depths) if strategy == "xla" else EagerStep()
