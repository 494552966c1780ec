"""Bytes a rank holds, measured from the tensors themselves, for the memory event of sharded and unsharded runs.

Counting storage (not elements) is what shows a strategy's real footprint: FSDP's padded shards, gradient buckets
and views into shared storage are counted as allocated, each storage once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def held_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard; None is skipped)."""
    from torch.distributed.tensor import DTensor

    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def optimizer_tensors(optimizer: Any) -> list[Any]:
    return [value for entry in optimizer.state.values() for value in entry.values()]


def memory_report(model: nn.Module, optimizer: Any, device: torch.device) -> dict[str, Any]:
    """params_bytes, grads_bytes, optimizer_bytes of this rank, and peak_bytes from the device allocator
    (CUDA/ROCm; None on devices without one)."""
    params = list(model.parameters())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "params_bytes": held_bytes(params),
        "grads_bytes": held_bytes(p.grad for p in params),
        "optimizer_bytes": held_bytes(optimizer_tensors(optimizer)),
        "peak_bytes": peak,
    }


def memory_line(report: dict[str, Any]) -> str:
    """The memory event as one printed line (GiB)."""
    gib = {
        k: f"{report[k] / 2**30:.3f}" if report.get(k) is not None else "n/a" for k in report if k.endswith("_bytes")
    }
    return (
        f"memory ({report['strategy']}, this rank): params {gib['params_bytes']} GiB, grads {gib['grads_bytes']} GiB, "
        f"optimizer {gib['optimizer_bytes']} GiB, peak {gib['peak_bytes']} GiB"
    )
