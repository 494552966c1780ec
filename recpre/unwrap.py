"""The plain module under the wrappers the fabric and torch.compile put around it.

Kept in a module of its own, below both the fabric and the checkpoint writer, which each need it.
"""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, for state dicts."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def plain_parameter_name(name: str) -> str:
    """A parameter's name as the bare model has it: a layer that peft wrapped for LoRA keeps its weight under
    `<layer>.base_layer.weight`, which weight-decay groups, initialisation and checkpoints know as `<layer>.weight`."""
    return name.replace(".base_layer.", ".")


def is_adapter_key(name: str) -> bool:
    """Whether `name` is a LoRA adapter's parameter (`<layer>.lora_A.<adapter>.weight`, `lora_B`), which no
    base weights file holds."""
    return ".lora_A." in name or ".lora_B." in name
