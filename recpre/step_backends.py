"""What differs between execution engines inside one optimizer step, behind one small interface chosen once
per run from `fabric.strategy`, so the driver's loop never branches on where it runs.

- `EagerStep` (CPU, CUDA/ROCm, MPS): clip on the host-visible norm, skip a non-finite step with an `if`.
- `XlaStep` (Trainium through torch-neuronx, TPU, XLA on CPU; recpre/xla.py): graph-stable recurrence (a cut
  after every no-grad iteration, a fixed number of grad iterations), clip and skip on the device by masking,
  values read after the step's graph is cut, weights and optimizer state moved to CPU for the files. Its
  `sweep` variant (`--compile-sweep`) visits every graph a run needs and writes no checkpoint.

A sharded strategy or a native Neuron device adds a backend (or fabric methods it calls), not a branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recpre import xla as xla_helpers
from recpre.fabric import unwrap_model


class EagerStep:
    """Eager execution: the reference behaviour every other backend must match."""

    name = "eager"
    saves_checkpoints = True

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Anything the engine needs before step 1 (nothing in eager mode)."""

    def training_depth(self, spec: Any, n: int, k: int, micro_step: int) -> tuple[int, int]:
        return n, k

    def seed_noise(self, seed: int) -> None:
        """Seed the generators the model's initial-state noise is drawn from."""
        torch.manual_seed(seed)

    def finish_step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        clip: float,
        loss_sum: torch.Tensor,
        fabric: Any,
    ) -> tuple[float, float]:
        """Clip, update unless the gradient norm is non-finite, clear gradients; (mean loss, grad norm)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        loss = float(fabric.all_reduce(loss_sum, op="mean"))
        if math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fabric.sync()
        return loss, grad_norm

    def metrics(self) -> dict[str, Any]:
        return {}

    def saveable_model(self, model: nn.Module) -> nn.Module:
        return model

    def to_cpu(self, state: Any) -> Any:
        return state

    def load_weights(self, model: nn.Module, path: Path, load: Callable[[nn.Module, Path], Any]) -> None:
        load(model, path)


class XlaStep(EagerStep):
    """PyTorch/XLA: a fixed set of compiled graphs whatever depth is sampled (recpre/xla.py)."""

    name = "xla"

    def __init__(self, config: Any, *, sweep_depths: list[int] | None = None) -> None:
        self.config, self.sweep = config, sweep_depths
        self.saves_checkpoints = not sweep_depths  # a sweep's weights are garbage under neuron_parallel_compile

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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

    def finish_step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        clip: float,
        loss_sum: torch.Tensor,
        fabric: Any,
    ) -> tuple[float, float]:
        """Clip and skip on the device, then cut the graph and read the values (no host sync inside a step)."""
        grad_norm_t = xla_helpers.masked_optimizer_step(optimizer, params, clip)
        loss_t = fabric.all_reduce(loss_sum, op="mean")
        optimizer.zero_grad(set_to_none=True)
        fabric.sync()
        grad_norm, loss = float(grad_norm_t), float(loss_t)
        if not math.isfinite(grad_norm):
            xla_helpers.rewind_step_counters(optimizer, fabric.device)
        return loss, grad_norm

    def metrics(self) -> dict[str, Any]:
        return {"xla_graphs": xla_helpers.compile_count()}

    def saveable_model(self, model: nn.Module) -> nn.Module:
        from recpre.model import build_model

        return xla_helpers.cpu_module(model, build_model(self.config, device="meta"))

    def to_cpu(self, state: Any) -> Any:
        return xla_helpers.to_cpu(state)

    def load_weights(self, model: nn.Module, path: Path, load: Callable[[nn.Module, Path], Any]) -> None:
        """safetensors reads into CPU weights, which are then copied onto the device."""
        from recpre.model import build_model

        empty = build_model(self.config, device="meta")
        xla_helpers.load_through_cpu(model, empty, lambda m: load(m, path))


def step_backend(strategy: str, config: Any, *, sweep_depths: list[int] | None = None) -> EagerStep:
    """The backend of a fabric strategy; `sweep_depths` (the backprop depths a run will use) makes the XLA
    backend a compile sweep."""
    return XlaStep(config, sweep_depths=sweep_depths) if strategy == "xla" else EagerStep()
