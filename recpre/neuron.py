"""The one adapter between recpre and the native TorchNeuron device (torch-neuronx 2.13/2.14, Neuron SDK 2.33).

Every call into torch-neuronx / NKI goes through a `NeuronRuntime`, so the rest of recpre is tested on CPU
against a fake with the same interface (tests/neuron_fake.py), never against guesses of torch-neuronx
internals. The packages are not on PyPI (their names there are empty placeholders); they come from AWS's
package index (requirements/neuron-sdk-2.33.txt, docs/trainium.md).

Which names are confirmed from the Neuron documentation, and where (checked 2026-12, docs "latest"):

  CONFIRMED  `import torch_neuronx` registers the `neuron` device and the `neuron` distributed backend
             (torch/guides/torch-distributed.html: `dist.init_process_group(backend="neuron", ...)`,
             `torch.device("neuron")`)
  CONFIRMED  `torch.accelerator` detects the device; `.to("neuron")`; `torch.autocast(device_type="neuron")`
             (torch/index.html, "What changes are needed?")
  CONFIRMED  `torch.compile(module, backend="neuron")`; `dynamic=True` is rejected, `fullgraph=True` is
             recommended (torch/compile/reference-torch-compile.html)
  CONFIRMED  `from torch_neuronx import nki_op`; `@nki_op("ns::name", mutates_args=...)` registers an NKI
             launcher as a PyTorch custom op, `register_autograd` adds its backward
             (torch/guides/how-to-work-with-nki.html, torch/get-started/quickstart-nki-kernel.html)
  UNVERIFIED the device index per local rank (`torch.device("neuron", local_rank)`): the docs' examples use
             `torch.device("neuron")` with one process per logical NeuronCore
  UNVERIFIED that `nki_op(...)(fn)` returns an object with torch.library.custom_op's `register_autograd(
             backward, setup_context=...)` signature (the docs name register_autograd; the signature is
             assumed to be torch.library's)
  UNVERIFIED the flash-attention kernels for the native path: `neuronxcc.nki.kernels.attention.flash_fwd` /
             `flash_attn_bwd` are documented for the XLA-era SDKs (<= 2.29); aws-neuron/nki-library's
             attention kernels may replace them. recpre calls them through recpre.attention.nki_kernels.NkiKernels.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import torch

DEVICE_TYPE = "neuron"
INSTALL_STEPS = (
    "install the Neuron SDK 2.33 packages from AWS's package index on a trn2/trn3 instance "
    "(pip install -r requirements/neuron-sdk-2.33.txt --extra-index-url https://pip.repos.neuron.amazonaws.com, "
    "see docs/trainium.md)"
)


class NeuronRuntime:
    """The real torch-neuronx: what recpre needs of it, and nothing more."""

    name = "torch-neuronx"
    device_type = DEVICE_TYPE  # CONFIRMED
    dist_backend = "neuron"  # CONFIRMED: the process-group backend torch_neuronx registers
    compile_backend = "neuron"  # CONFIRMED: torch.compile(backend="neuron")

    def installed(self) -> bool:
        """Whether torch_neuronx can be imported here (no import: it loads the runtime)."""
        try:
            return importlib.util.find_spec("torch_neuronx") is not None
        except (ImportError, ValueError):
            return False

    def load(self) -> None:
        """Import torch_neuronx, which registers the device and the collectives backend (CONFIRMED)."""
        importlib.import_module("torch_neuronx")

    def native_device_present(self) -> bool:
        """Whether the native `neuron` device is registered and has at least one NeuronCore (torch.accelerator)."""
        if not self.installed():
            return False
        try:
            self.load()
            current = torch.accelerator.current_accelerator()
        except (ImportError, RuntimeError):
            return False  # an XLA-era torch-neuronx (SDK <= 2.29) has no native device
        return current is not None and current.type == DEVICE_TYPE and torch.accelerator.device_count() > 0

    def device_count(self) -> int:
        return torch.accelerator.device_count()

    def device(self, local_rank: int) -> torch.device:
        """This rank's NeuronCore (UNVERIFIED index convention: one visible core per rank -> index 0)."""
        count = self.device_count()
        return torch.device(DEVICE_TYPE, 0 if count == 1 else local_rank)

    def synchronize(self) -> None:
        torch.accelerator.synchronize()

    def custom_op(self, name: str, fn: Callable[..., Any]) -> Any:
        """Register `fn` (a typed launcher of NKI kernels) as the custom op `name` (CONFIRMED: nki_op)."""
        nki_op = importlib.import_module("torch_neuronx").nki_op
        return nki_op(name, mutates_args=())(fn)

    def attention_kernels(self) -> Any:
        """The flash-attention kernels as NkiKernels (UNVERIFIED on the native path)."""
        from recpre.attention.nki_kernels import aws_kernels

        return aws_kernels()


_override: list[Any] = []
_real = NeuronRuntime()


def runtime() -> Any:
    """The runtime in use: a fake installed with use_runtime() (tests), else torch-neuronx."""
    return _override[-1] if _override else _real


@contextlib.contextmanager
def use_runtime(fake: Any) -> Iterator[Any]:
    """Run recpre's native-Neuron paths against `fake` inside the block (it has NeuronRuntime's interface)."""
    _override.append(fake)
    try:
        yield fake
    finally:
        _override.remove(fake)


def require_runtime() -> Any:
    """The runtime, loaded; a UserError naming the install steps when torch-neuronx is missing."""
    from recpre.errors import UserError

    rt = runtime()
    if not rt.installed():
        raise UserError(f"fabric.device=neuron needs torch-neuronx, which is not installed: {INSTALL_STEPS}.")
    rt.load()
    return rt
