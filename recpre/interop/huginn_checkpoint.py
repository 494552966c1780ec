"""Huginn-format folders <-> recpre checkpoints, for the `evaluate/import_huginn.py` and `export_huginn.py` CLIs.

An imported checkpoint holds weights, the model config and settings whose `model.name` + `model.overrides`
rebuild exactly that shape, but no optimizer state: `train.py` resuming it (or `run.init_from` naming it)
starts training at step 0 from those weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.model_registry import names as registry_names

# Fields that are runtime choices, not part of the shape a registry entry fixes.
_RUNTIME = {"name", "attention", "fused_head", "activation_checkpointing"}


def registry_overrides(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The registry shape closest to `config` and the overrides that turn it into `config` exactly."""
    target = config.to_dict()
    best: tuple[str, dict[str, Any]] | None = None
    for name in registry_names():
        base = ModelConfig.from_name(name).to_dict()
        diff = {k: v for k, v in target.items() if k not in _RUNTIME and base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    assert best is not None
    return best


def import_huginn_checkpoint(source: str | Path, run_dir: str | Path, *, run_name: str | None = None) -> Path:
    """Turn a Huginn folder (config.json + safetensors) into RUN_DIR/checkpoints/step-00000000."""
    from recpre.checkpoint import save_checkpoint
    from recpre.interop.huginn import from_huginn
    from recpre.settings import load_settings, settings_to_yaml

    source, run_dir = Path(source), Path(run_dir)
    if not source.is_dir() or not (source / "config.json").is_file():
        raise UserError(f"--input {source} is not a Huginn folder with a config.json; pass the downloaded folder")
    if (run_dir / "checkpoints").exists():
        raise UserError(f"--output {run_dir} already holds checkpoints; choose a new folder")
    model = from_huginn(source)
    name, overrides = registry_overrides(model.config)
    items = [f"model.name={name}", f"run.name={run_name or run_dir.name}", f"run.out_dir={run_dir}"]
    items += [f"model.overrides.{k}={json.dumps(v)}" for k, v in overrides.items()]
    settings = load_settings(None, items)
    return save_checkpoint(
        run_dir / "checkpoints",
        0,
        model=model,
        model_config=model.config.to_dict(),
        settings_yaml=settings_to_yaml(settings),
        state={"imported_from": str(source.resolve())},
        rank_state={},
    )


def export_huginn_checkpoint(checkpoint: str | Path, output: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a recpre checkpoint (folder, run folder or `latest`) as a Huginn folder."""
    from recpre.checkpoint import load_model
    from recpre.interop.huginn import to_huginn
    from recpre.model import RecurrentGPT

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} exists and is not empty; choose a new folder")
    model, _ = load_model(checkpoint)
    if not isinstance(model, RecurrentGPT):
        raise UserError(f"checkpoint {checkpoint} holds a GPT model; only recurrent-depth models export to Huginn")
    to_huginn(model, output, dtype=dtype)
    return output
