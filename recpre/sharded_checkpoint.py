"""Sharded checkpoints: every rank writes its own shards through torch.distributed.checkpoint (DCP).

Used for runs whose state is spread over ranks (`fsdp`, `hsdp`, `simple-ddp` with optimizer sharding): nothing
is gathered onto one rank to save. The checkpoint folder keeps recpre's layout (state.pt, rank files,
settings.yaml, model_config.json, manifest.json with the size and sha256 of every file) and holds, instead of
model.safetensors, DCP's `.metadata` and one `__R_0.distcp` file per writing rank. Its tensors are named in the
single-process format, whatever the strategy that wrote them:

    model/<parameter name>              the whole tensor (its shards, as DCP chunks)
    optim/<index>/<key>                 optimizer state of parameter <index> (the single-process order)
    optim/<index>/<key>@<offset>        a flat slice of it, written by the ZeRO-1 rank that owns it

and the non-tensor optimizer state (param groups, python scalars, shapes of sliced entries) lives in state.pt
under "optimizer". So any strategy at any world size reads it back as the full single-process state
(`read_full_state`) and hands each rank its part through the fabric, and one process loads the whole model.

No pickle is executed on load: stock DCP unpickles `.metadata` and `torch.load`s byte entries with
`weights_only=False`. Here `.metadata` goes through an unpickler that admits only DCP's metadata classes, and
byte entries through `torch.load(weights_only=True)` (recpre writes none).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recpre.errors import UserError

DCP_METADATA = ".metadata"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
_PIECE = re.compile(r"^optim/(\d+)/(.+)@(\d+)$")
_ENTRY = re.compile(r"^optim/(\d+)/(.+)$")

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def writes_sharded(fabric: Any) -> bool:
    """Whether this run's state is spread over ranks, so each rank writes its own shards."""
    if fabric is None:
        return False
    # fsdp/hsdp are the strategies that build on meta (no rank holds the whole model); _zero: optimizer sharding
    return bool(getattr(fabric, "builds_on_meta", False)) or getattr(fabric, "_zero", None) is not None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes; refuses every other global (nothing else runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not one of DCP's metadata classes")


def read_metadata(folder: Path) -> Any:
    """DCP's `.metadata` of `folder`, unpickled with only DCP's metadata classes admitted."""
    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise UserError(
            f"{path} is not a DCP metadata file recpre can read ({err}); it was not written by recpre or was "
            "tampered with: delete that checkpoint folder or set run.resume to another one"
        ) from None


def _reader_and_planner(folder: Path) -> tuple[Any, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return SafeReader(str(folder)), SafePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def read_tensors(folder: Path, prefix: str = "") -> dict[str, Any]:
    """Every entry of the DCP checkpoint in `folder` whose name starts with `prefix`, as whole CPU tensors
    (assembled from all ranks' shards) read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(folder)
    state: dict[str, Any] = {}
    for name, meta in metadata.state_dict_metadata.items():
        if not name.startswith(prefix):
            continue
        if isinstance(meta, TensorStorageMetadata):
            state[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            state[name] = None
    reader, planner = _reader_and_planner(folder)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as err:
        refused = next((c for c in _causes(err) if isinstance(c, pickle.UnpicklingError)), None)
        if refused is None:
            raise
        found = next((line.strip() for line in str(refused).splitlines() if "GLOBAL" in line), "")
        raise UserError(
            f"{folder} holds an entry other than tensors and plain python values, which "
            f"torch.load(weights_only=True) refuses{f' ({found})' if found else ''}; it was not written by recpre "
            "or was tampered with: delete that checkpoint folder or set run.resume to another one"
        ) from None
    return state


def _causes(err: BaseException) -> list[BaseException]:
    """The per-rank errors DCP wraps in a CheckpointException (a BaseException: `except Exception` misses it)."""
    return [failure[0] for failure in getattr(err, "failures", {}).values()]


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights (name -> tensor) of a sharded checkpoint, in one process."""
    return {name[len(MODEL_PREFIX) :]: t for name, t in read_tensors(folder, MODEL_PREFIX).items()}


def read_full_state(folder: Path, extras: dict[str, Any]) -> dict[str, Any]:
    """{"model", "optimizer"} of a sharded checkpoint in the single-process format (fabric.full_state_dict's),
    `extras` being state.pt's "optimizer" entry."""
    tensors = read_tensors(folder)
    weights = {name[len(MODEL_PREFIX) :]: t for name, t in tensors.items() if name.startswith(MODEL_PREFIX)}
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in extras.get("state", {}).items()}
    pieces: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
    for name, value in tensors.items():
        piece = _PIECE.match(name)
        entry = _ENTRY.match(name)
        if piece:
            pieces.setdefault((int(piece.group(1)), piece.group(2)), []).append((int(piece.group(3)), value))
        elif entry:
            state.setdefault(int(entry.group(1)), {})[entry.group(2)] = value
    for (index, key), parts in pieces.items():
        flat = torch.cat([t.reshape(-1) for _, t in sorted(parts, key=lambda item: item[0])])
        state.setdefault(index, {})[key] = flat.view(extras["shapes"][index])
    optimizer = {"state": dict(sorted(state.items())), "param_groups": extras["param_groups"]}
    return {"model": weights, "optimizer": optimizer}


def local_shards(
    fabric: Any, model: nn.Module, optimizer: Any, select: Callable[[dict], dict] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(this rank's tensors to write, named as above; the non-tensor optimizer state, complete on rank 0).
    `select` picks the weights that are saved (a LoRA run's adapters) from the model's state dict."""
    weights = fabric.unwrap(model).state_dict()
    if select is not None:
        weights = select(weights)
    tensors: dict[str, Any] = {MODEL_PREFIX + k: v.detach() for k, v in weights.items()}
    zero = getattr(fabric, "_zero", None)
    if zero is not None:
        pieces, extras = zero.sharded_state_dict()
        tensors.update({OPTIM_PREFIX + k: v for k, v in pieces.items()})
        if extras is not None:
            extras["param_groups"] = _plain_groups(extras["param_groups"])
        return tensors, extras if fabric.is_main else None
    saved = optimizer.state_dict()
    scalars: dict[int, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{index}/{key}"] = value.detach()
            else:
                scalars.setdefault(int(index), {})[key] = value
    extras = {"state": scalars, "shapes": {}, "param_groups": _plain_groups(saved["param_groups"])}
    return tensors, extras if fabric.is_main else None


def _plain_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param groups as weights_only-safe values (tensor hyperparameters to CPU)."""
    return [{k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in g.items()} for g in groups]


def write_shards(folder: Path, tensors: dict[str, Any], process_group: Any = None) -> None:
    """Every rank writes its shards of `tensors` into `folder` (rank 0 also `.metadata`). Collective over
    `process_group` (None: the default group)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True)
    try:
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=not dist.is_initialized())
    except CheckpointException as err:  # a full disk on any rank: its OSError, so the save fails cleanly
        raise next((c for c in _causes(err) if isinstance(c, OSError)), RuntimeError(str(err))) from err
