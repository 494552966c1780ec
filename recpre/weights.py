"""Where a run's first weights come from (`run.init_from`): a recpre checkpoint, a .safetensors file, or a
folder in the public Huginn-0125 format, converted on the fly.

Kept apart from `recpre.checkpoint`, which knows only recpre's own format, so that the checkpoint module does
not depend on the interop converters above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from recpre.checkpoint import (
    MANIFEST_FILE,
    load_weights,
    open_weights,
    shape_differences,
    unwrap_model,
    weights_path,
)
from recpre.errors import UserError
from recpre.unwrap import is_adapter_key, plain_parameter_name


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
        weights, strict = _under_model_names(model, weights, path)
        fabric.load_full_state_dict(model, None, {"model": weights}, source=str(path), strict=strict)
        return path
    if not is_huginn_folder(source):
        return load_weights(model, source, config=config)
    unwrap_model(model).load_state_dict(_huginn_state(source, config), strict=True)
    return source


def initial_weights_path(source: str | Path) -> Path:
    """The file (or folder) load_initial_weights reads `source` from, without reading it."""
    source = Path(source)
    return source if is_huginn_folder(source) else weights_path(source)


def _under_model_names(model: nn.Module, weights: Any, source: Path) -> tuple[Any, bool]:
    """(`weights` under the names of `model`, strict): a model with LoRA adapters (a sharded LoRA run injects
    them before the base is loaded) keeps a wrapped layer's weight as `<layer>.base_layer.weight`, and its
    adapters are not in a base's file (strict False leaves them as drawn)."""
    names = {plain_parameter_name(n): n for n, _ in unwrap_model(model).named_parameters()}
    if not any(is_adapter_key(n) for n in names.values()):
        return weights, True
    base = {plain: name for plain, name in names.items() if not is_adapter_key(name)}
    missing = sorted(set(base) - set(weights.keys()))
    if missing:
        raise UserError(f"weights in {source} do not fit this model (missing {missing[:5]})")
    return _Renamed(weights, {name: plain for plain, name in base.items()}), False


class _Renamed:
    """A read-only view of a (lazy) weights mapping under the model's names (names it does not map: as they are,
    so that the loader refuses them as unexpected)."""

    def __init__(self, weights: Any, names: dict[str, str]) -> None:
        self.weights, self.names = weights, names
        self.unexpected = sorted(set(weights.keys()) - set(names.values()))

    def keys(self) -> list[str]:
        return [*self.names, *self.unexpected]

    def __contains__(self, name: str) -> bool:
        return name in self.names or name in self.unexpected

    def __getitem__(self, name: str) -> Any:
        return self.weights[self.names.get(name, name)]


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
