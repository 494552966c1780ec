"""Training FLOPs at a sampled depth and model FLOPs utilisation against a per-device peak table.

MFU is reported against two denominators where we have them: the datasheet dense bf16 peak, and a
measured bf16 matmul rate (docs/performance.md, "MFU"), which is what a well-tuned kernel can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    datasheet_tflops: float  # dense bf16, per device (GPU, GCD or NeuronCore)
    measured_tflops: float | None = None  # bf16 matmul 8192^3 measured on this project's machines


# Matched by substring against torch.cuda.get_device_name() (lower case), most specific first.
PEAKS: dict[str, Peak] = {
    "h200": Peak(989.0, 790.0),
    "h100": Peak(989.0, 798.0),
    "a100": Peak(312.0),
    "mi250x": Peak(191.5),  # per GCD (one of two per card), as seen by torch
    "mi300x": Peak(1307.0),
    "trainium1": Peak(95.0),  # per NeuronCore-v2: ~3040 TFLOP/s per 32-core trn1.32xlarge node
}


def device_peak(device: torch.device | str) -> tuple[str, Peak | None]:
    """A readable device name and its peak table entry (None on CPU or an unknown accelerator)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name.lower().replace(" ", ""):
                return name, peak
        return name, None
    if device.type == "xla":
        return "trainium1", PEAKS["trainium1"]
    return device.type, None


def training_flops_per_token(config, n: int, k: int) -> float:
    """FLOPs per token of one training micro-step at depth (n, k): n forward-only iterations, k with backward.

    The count itself is the model config's (`ModelConfig.flops_per_token`), the single source of truth.
    """
    return float(config.flops_per_token((n, k), training=True))


def mfu(flops_per_s: float, peak: Peak | None, world_size: int = 1) -> tuple[float | None, float | None]:
    """(MFU against the datasheet peak, MFU against the measured matmul rate), or None where unknown."""
    if peak is None or flops_per_s <= 0:
        return None, None
    datasheet = flops_per_s / (peak.datasheet_tflops * 1e12 * world_size)
    measured = flops_per_s / (peak.measured_tflops * 1e12 * world_size) if peak.measured_tflops else None
    return datasheet, measured
