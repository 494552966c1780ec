"""A fake of recpre.neuron.NeuronRuntime's interface: the native Neuron device mapped onto the CPU.

It records what recpre asks of the runtime (loads, devices, registered ops, kernel launches with their
shapes), so tests check the calls recpre makes, not guesses of torch-neuronx internals.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from recpre.attention.nki import NkiKernels
from recpre.attention.nki_standin import standin_kernels


class RecordingKernels:
    """The stand-in kernels, recording each launch's grid and input shapes."""

    def __init__(self, kernels: NkiKernels) -> None:
        self.inner = kernels
        self.launches: list[tuple[str, tuple, list[tuple[int, ...]], dict[str, Any]]] = []

    def as_kernels(self) -> NkiKernels:
        return NkiKernels(
            fwd=_Grid(self, "fwd", self.inner.fwd),
            bwd=_Grid(self, "bwd", self.inner.bwd),
            make_config=self.inner.make_config,
            name="recording-standin",
        )


class _Grid:
    def __init__(self, owner: RecordingKernels, name: str, kernel: Any) -> None:
        self.owner, self.name, self.kernel = owner, name, kernel

    def __getitem__(self, grid: tuple) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            flags = {k: v for k, v in kwargs.items() if k in ("use_causal_mask", "softmax_scale")}
            self.owner.launches.append((self.name, tuple(grid), shapes, flags))
            return self.kernel[grid](*args, **kwargs)

        return launch


_instances = itertools.count()


class FakeNeuronRuntime:
    """NeuronRuntime's interface on the CPU: gloo for the collectives, torch.library for the custom ops."""

    name = "fake"
    device_type = "cpu"  # the fake's neuron device is the CPU
    dist_backend = "gloo"

    def __init__(self, *, installed: bool = True, cores: int = 2) -> None:
        self._installed, self.cores = installed, cores
        self.namespace = f"recpre_fake{next(_instances)}"  # torch.library names are process-wide
        self.loads = 0
        self.devices_asked: list[int] = []
        self.ops: dict[str, Any] = {}
        self.kernels = RecordingKernels(standin_kernels())
        self.compiled: list[Any] = []  # FX graphs handed to the compile backend
        self.compile_backend = self._compile  # torch.compile(backend=...) takes a callable too

    def _compile(self, graph_module: Any, example_inputs: Any) -> Any:
        self.compiled.append(graph_module)
        return graph_module.forward

    def installed(self) -> bool:
        return self._installed

    def load(self) -> None:
        self.loads += 1

    def native_device_present(self) -> bool:
        return self._installed and self.cores > 0

    def device_count(self) -> int:
        return self.cores

    def device(self, local_rank: int) -> torch.device:
        self.devices_asked.append(local_rank)
        return torch.device("cpu")

    def synchronize(self) -> None:
        pass

    def custom_op(self, name: str, fn: Any) -> Any:
        op = torch.library.custom_op(f"{self.namespace}::{name.split('::')[1]}", mutates_args=())(fn)
        self.ops[name] = op
        return op

    def attention_kernels(self) -> NkiKernels:
        return self.kernels.as_kernels()
