"""Where a run's first weights come from (`run.init_from`): a recpre checkpoint, a .safetensors file, or a
folder in the public Huginn-0125 format, converted on the fly.

Kept apart from `recpre.checkpoint`, which knows only recpre's own format, so that the checkpoint module does
not depend on the interop converters above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from recpre.checkpoint import MANIFEST_FILE, load_weights, shape_differences, unwrap_model
from recpre.errors import UserError


def is_huginn_folder(source: Path) -> bool:
    return source.is_dir() and (source / "config.json").is_file() and not (source / MANIFEST_FILE).exists()


def load_initial_weights(model: nn.Module, source: str | Path, *, config: dict[str, Any] | None = None) -> Path:
    """Weights into `model` from any supported source; another model shape is refused, naming the fields."""
    source = Path(source)
    if not is_huginn_folder(source):
        return load_weights(model, source, config=config)
    from recpre.interop.huginn import from_huginn

    imported = from_huginn(source)
    diffs = shape_differences(imported.config.to_dict(), config) if config is not None else []
    if diffs:
        raise UserError(
            f"Huginn checkpoint {source} holds a different model shape ({'; '.join(diffs)}); "
            "use model.name/model.overrides that match it"
        )
    unwrap_model(model).load_state_dict(imported.state_dict(), strict=True)
    return source
