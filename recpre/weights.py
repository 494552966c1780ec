"""Where a run's first weights come from (`run.init_from`): a recpre checkpoint, a .safetensors file, or a
folder in the public Huginn-0125 format, converted on the fly.

Kept apart from `recpre.checkpoint`, which knows only recpre's own format, so that the checkpoint module does
not depend on the interop converters above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from recpre.checkpoint import MANIFEST_FILE, load_weights, open_weights, shape_differences, unwrap_model
from recpre.errors import UserError


def is_huginn_folder(source: Path) -> bool:
    return source.is_dir() and (source / "config.json").is_file() and not (source / MANIFEST_FILE).exists()


def open_initial_weights(source: str | Path, *, config: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """(source, mapping name -> full tensor): a Huginn folder converted in memory, anything else read lazily."""
    source = Path(source)
    if not is_huginn_folder(source):
        return open_weights(source, config=config)
    return source, _huginn_state(source, config)


def load_initial_weights(
    model: nn.Module, source: str | Path, *, config: dict[str, Any] | None = None, fabric: Any = None
) -> Path:
    """Weights into `model` from any supported source; another model shape is refused, naming the fields.

    A model the fabric has sharded (`fabric.builds_on_meta`) takes them one full tensor at a time and keeps its
    shards, so no rank holds a second full copy of a safetensors source.
    """
    source = Path(source)
    if fabric is not None and fabric.builds_on_meta:
        path, weights = open_initial_weights(source, config=config)
        fabric.load_full_state_dict(model, None, {"model": weights}, source=str(path))
        return path
    if not is_huginn_folder(source):
        return load_weights(model, source, config=config)
    unwrap_model(model).load_state_dict(_huginn_state(source, config), strict=True)
    return source


def _huginn_state(source: Path, config: dict[str, Any] | None) -> dict[str, Any]:
    from recpre.interop.huginn import from_huginn

    imported = from_huginn(source)
    diffs = shape_differences(imported.config.to_dict(), config) if config is not None else []
    if diffs:
        raise UserError(
            f"Huginn checkpoint {source} holds a different model shape ({'; '.join(diffs)}); "
            "use model.name/model.overrides that match it"
        )
    return imported.state_dict()
