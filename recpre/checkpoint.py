"""Checkpoints: atomic save, verified load, resume, retention.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNNNN/`:

    model.safetensors   weights (tied tensors stored once); a sharded run (fsdp, hsdp, optimizer sharding)
                        writes instead, from every rank, DCP's `.metadata` and `__R_0.distcp` shards of the
                        weights and optimizer state (recpre/sharded_checkpoint.py)
    state.pt            optimizer, counters, schedule, depth-sampler position, RNG and loader state of
                        rank 0; plain tensors and python types only, so `torch.load(weights_only=True)`
                        reads it (no arbitrary pickles)
    rank-NNNNN.pt       the same per-rank part for ranks > 0 (multi-process runs only)
    settings.yaml       the resolved settings of the run
    model_config.json   ModelConfig.to_dict()
    manifest.json       sha256 and size of every other file; written last

It is written into `checkpoints/.tmp-step-NNNNNNNN/`, fsync'd and renamed, then the text file
`checkpoints/latest` is replaced atomically. A folder without a valid manifest is never used: loading
falls back to the previous complete checkpoint with a warning that names the bad one. With `checkpoint.async`
the same save runs in a background thread on a snapshot of the state (recpre/async_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recpre.config import RECURRENCE_DEFAULTS, RUNTIME_FIELDS
from recpre.errors import UserError
from recpre.sharded_checkpoint import DCP_METADATA, is_sharded_checkpoint, write_shards
from recpre.unwrap import unwrap_model

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
SETTINGS_FILE = "settings.yaml"
CONFIG_FILE = "model_config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")

# ModelConfig fields that are not architecture: a checkpoint loads whatever they are.
NOT_SHAPE = frozenset((*RUNTIME_FIELDS, *RECURRENCE_DEFAULTS))


class CheckpointError(Exception):
    """A checkpoint folder that is incomplete or corrupt."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoint is untouched."""


# Settings a run cannot change and still continue from its checkpoint: the data order depends on the seed, the
# micro-batch size and the mixture weights; the optimizer state on the optimizer and its parameter groups.
RESUME_KEYS = ("run.seed", "train.micro_batch_size", "data.weights", "optim.name", "optim.no_decay")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# -- RNG ------------------------------------------------------------------------------------------------


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Every generator a training step draws from, as weights_only-safe objects."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    device = torch.device(device) if device is not None else None
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# -- files ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_manifest(folder: Path, step: int, serial: int | None = None) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_FILE or not path.is_file():
            continue
        _fsync_file(path)
        files[path.name] = {"sha256": _sha256(path), "size": path.stat().st_size}
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": files}
    if serial is not None:
        manifest["serial"] = serial
    with open(folder / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError naming what is wrong otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST_FILE} (an interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path} is not a valid manifest") from err
    for required in (STATE_FILE, CONFIG_FILE):
        if required not in files:
            raise CheckpointError(f"{folder} manifest lists no {required}")
    if MODEL_FILE not in files and DCP_METADATA not in files:  # weights: one file, or DCP shards (sharded runs)
        raise CheckpointError(f"{folder} manifest lists neither {MODEL_FILE} nor {DCP_METADATA}")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {meta['size']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest")
    return manifest


# -- locating -------------------------------------------------------------------------------------------


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root` (a checkpoints/ folder) that have a manifest, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_RE.match(path.name)
        if m and path.is_dir() and (path / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _serial(folder: Path) -> int | None:
    """The save counter in a folder's manifest; None for checkpoints written before it existed (or unreadable)."""
    try:
        serial = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8")).get("serial")
    except (OSError, ValueError, AttributeError):
        return None
    return serial if isinstance(serial, int) else None


def checkpoints_in_save_order(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest save first: by the manifest's save counter, then by step.

    Not by step alone: after `run.resume=<an older step>` the folders of higher steps left from before are
    older saves than the ones this run writes. Folders without a counter (older format) count as older.
    """

    def key(path: Path) -> tuple[int, int, int]:
        serial = _serial(path)
        step = int(_STEP_RE.match(path.name).group(1))
        return (0, step, 0) if serial is None else (1, serial, step)

    return sorted(list_checkpoints(root), key=key)


def _aside(folder: Path) -> Path:
    """Where a re-save moves the old folder of the same step until the new one is in place."""
    return folder.with_name(f".old-{folder.name}")


def _latest_candidates(root: Path) -> list[Path]:
    """The folder `latest` names first, then every complete folder, newest save first.

    A re-save killed between its two renames leaves `latest` naming a missing folder and the old one aside:
    that one comes right after it.
    """
    candidates = list(reversed(checkpoints_in_save_order(root)))
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named in candidates:
            candidates.remove(named)
        candidates.insert(0, named)
        if not named.exists() and _aside(named).is_dir():
            candidates.insert(1, _aside(named))
    return candidates


def find_latest(root: Path) -> Path | None:
    """The newest checkpoint under `root` (a checkpoints/ folder) that verifies; None when there is none.

    A bad one (torn, corrupt, missing files) is skipped with a warning that names it.
    """
    root = Path(root)
    if root.is_dir():  # torn folders (no manifest) are not candidates at all, but say so
        for folder in sorted(root.iterdir()):
            if _STEP_RE.match(folder.name) and folder.is_dir() and not (folder / MANIFEST_FILE).is_file():
                warnings.warn(f"skipping bad checkpoint {folder}: it has no {MANIFEST_FILE}", stacklevel=2)
    for folder in _latest_candidates(root):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as err:
            warnings.warn(f"skipping bad checkpoint {folder}: {err}; falling back to the previous one", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint folder from a checkpoint folder, a `latest` file, a checkpoints/ or a run folder."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        root = path.parent
    elif path.is_dir() and (path / MANIFEST_FILE).exists() or _STEP_RE.match(path.name):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            raise UserError(f"checkpoint {path} cannot be used: {err}") from err
        return path
    elif path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():
        root = path / CHECKPOINTS_DIR
    elif path.is_dir() and (path / LATEST).is_file() or list_checkpoints(path):
        root = path
    else:
        raise UserError(f"{path} is not a checkpoint folder, a run folder or a checkpoints/latest file")
    found = find_latest(root)
    if found is None:
        raise UserError(f"no complete checkpoint under {root}; pass a step-NNNNNNNN folder that has a manifest.json")
    return found


# -- what an earlier attempt left ------------------------------------------------------------------------

_ASIDE_RE = re.compile(r"^\.old-step-(\d{8,})$")


def earlier_attempt(run_dir: Path) -> dict[str, Any]:
    """What an earlier attempt left in `run_dir` that a fresh start would overwrite or prune.

    `folders`: checkpoint folders (step-N, and .old-step-N set aside by a re-save), whatever their state;
    `without_manifest`: those of them with no manifest.json; `saved`: steps of the checkpoints metrics.jsonl
    records as saved; `last_step`: the last training step it records (0 when none).
    """
    from recpre.monitor import METRICS_FILE, read_metrics

    root = Path(run_dir) / CHECKPOINTS_DIR
    folders = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and (_STEP_RE.match(path.name) or _ASIDE_RE.match(path.name)):
                folders.append(path)
    folders.sort(key=lambda p: (int(p.name.rsplit("-", 1)[1]), p.name))
    rows = read_metrics(Path(run_dir) / METRICS_FILE)
    return {
        "folders": [p.name for p in folders],
        "without_manifest": [p.name for p in folders if not (p / MANIFEST_FILE).is_file()],
        "saved": [r["step"] for r in rows if r.get("event") == "checkpoint" and isinstance(r.get("step"), int)],
        "last_step": max((r["step"] for r in rows if "loss" in r and isinstance(r.get("step"), int)), default=0),
    }


def _describe(found: dict[str, Any], root: Path) -> str:
    parts = []
    if found["folders"]:
        names = found["folders"]
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        missing = (
            f", {len(found['without_manifest'])} of them without {MANIFEST_FILE}" if found["without_manifest"] else ""
        )
        parts.append(f"{len(names)} checkpoint folder{'s' * (len(names) > 1)} in {root} ({span}{missing})")
    if found["saved"]:
        parts.append(
            f"a metrics.jsonl that records {found['last_step']} training steps and checkpoints saved at steps "
            + ", ".join(map(str, found["saved"]))
        )
    return " and ".join(parts)


def refuse_to_overwrite(run_dir: Path, resume: str) -> None:
    """Refuse to start `run_dir` over when an earlier attempt left checkpoints (verifiable or not) or a record of
    saved ones: a fresh start would rewrite metrics.jsonl and, with checkpoint.keep, prune those folders.

    An attempt that died before its first checkpoint left only training rows; they are replaced, with a warning.
    """
    found = earlier_attempt(run_dir)
    root = Path(run_dir) / CHECKPOINTS_DIR
    if found["folders"] or found["saved"]:
        if resume == "never":
            why, remedy = "run.resume=never", "set run.resume=auto to continue it"
        elif found["folders"]:
            why = "none of the checkpoints in it verifies (see the warnings above)"
            remedy = "restore a complete checkpoint or set run.resume to one"
        else:
            why, remedy = "the checkpoints it records are gone", "restore them or set run.resume to one"
        raise UserError(
            f"{run_dir} holds an earlier attempt of this run ({_describe(found, root)}) but {why}, and starting "
            f"over would overwrite it: {remedy}, or start over deliberately in a new folder (another run.out_dir, "
            "with run.resume=never)"
        )
    if found["last_step"]:
        warnings.warn(
            f"{run_dir}/metrics.jsonl records {found['last_step']} training steps of an attempt that ended before "
            "its first checkpoint; starting over from step 0 and replacing them",
            stacklevel=2,
        )


# -- saving ---------------------------------------------------------------------------------------------

_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)|errno (\d+)", re.IGNORECASE)
_PROBE_BYTES = 1 << 20


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Run one writer; a failed write comes out as an OSError naming the file and the cause.

    The writers do not all raise OSError on a full disk: safetensors raises SafetensorError ("... os error 28"),
    torch.save a RuntimeError that carries no errno at all ("unexpected pos 704 vs 662"). Without an errno the
    filesystem is asked directly: a probe write that fails there gives the cause (ENOSPC, EDQUOT, EROFS, EIO).
    An error the filesystem does not explain (a bug, an object that cannot be saved) is raised unchanged.
    """
    try:
        write(path)
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
    except Exception as err:
        code = _errno_in_message(err) or _probe_write(path.parent)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _errno_in_message(err: BaseException) -> int | None:
    found = _OS_ERROR_IN_MESSAGE.search(str(err))
    return int(found.group(1) or found.group(2)) if found else None


def _probe_write(folder: Path) -> int | None:
    """The errno with which `folder`'s filesystem refuses a 1 MiB write now; None when it takes it."""
    probe = folder / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err.errno
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    model_config: dict[str, Any],
    settings_yaml: str,
    state: dict[str, Any],
    rank_state: dict[str, Any],
    fabric: Any = None,
    keep: int = 0,
    shards: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `root` (RUN/checkpoints) and point `latest` at it.

    `model` is the module or its full weights (name -> tensor, read on rank 0 only).
    `state` is shared by all ranks (written by rank 0); `rank_state` is this rank's own (loader, RNG).
    With `shards` (recpre.sharded_checkpoint.local_shards), each rank writes its own shards through DCP
    instead of rank 0 writing `model`.
    Every rank must call this; on a shared filesystem each rank writes its own rank file. A failed write (disk
    full) removes the partial temp folder and raises CheckpointSaveError; `latest` keeps naming the previous one.
    """
    root = Path(root)
    rank = fabric.rank if fabric is not None else 0
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}"
    try:
        return _save_checkpoint(root, step, model, model_config, settings_yaml, state, rank_state, fabric, keep, shards)
    except OSError as err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for leftover in root.glob(f".{LATEST}.tmp-*"):
                leftover.unlink(missing_ok=True)
        pointer = root / LATEST
        previous = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        kept = f"the previous checkpoint {previous} is untouched" if previous else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"could not write checkpoint {name} in {root} ({err.strerror or err}: {err.filename or '?'}); {kept}: "
            "free space (or set run.out_dir elsewhere) and run the same command to resume"
        ) from err


def _save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    model_config: dict[str, Any],
    settings_yaml: str,
    state: dict[str, Any],
    rank_state: dict[str, Any],
    fabric: Any,
    keep: int,
    shards: dict[str, Any] | None = None,
) -> Path:
    from safetensors.torch import save_file, save_model

    rank = fabric.rank if fabric is not None else 0
    world = fabric.world_size if fabric is not None else 1
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if world > 1:
        fabric.barrier()
    if shards is not None:
        group = getattr(fabric, "process_group", None)  # an asynchronous save's own group (recpre/async_checkpoint.py)
        _write_file(tmp / DCP_METADATA, lambda path: write_shards(path.parent, shards, process_group=group))
    if rank != 0:
        _write_file(tmp / rank_file(rank), lambda path: torch.save(rank_state, path))
    else:
        if shards is None:
            if isinstance(model, nn.Module):
                weights, write = unwrap_model(model), save_model
            else:  # full weights (SimpleFabric.full_state_dict): a module's state_dict holds tied tensors once
                weights, write = {k: v.contiguous() for k, v in model.items()}, save_file
            _write_file(tmp / MODEL_FILE, lambda path: write(weights, str(path), metadata={"step": str(step)}))
        shared = {"format": FORMAT_VERSION, "step": step, "world_size": world, **state, "rank": rank_state}
        _write_file(tmp / STATE_FILE, lambda path: torch.save(shared, path))
        (tmp / SETTINGS_FILE).write_text(settings_yaml, encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=1, sort_keys=True), encoding="utf-8")
    if world > 1:
        fabric.barrier()
    if rank == 0:
        _write_manifest(tmp, step, _next_serial(root))
        old = None
        if final.exists():  # a re-save of the same step (e.g. resumed and stopped again right away)
            # Keep the old folder whole until the new one is in place: deleting it first would leave
            # `latest` naming nothing if the process died during the delete.
            old = _aside(final)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None and not final.exists():
                os.replace(old, final)
            raise
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        prune_checkpoints(root, keep)
    if world > 1:
        fabric.barrier()
    return final


def _next_serial(root: Path) -> int:
    """One more than the largest save counter under `root`: save order survives resuming from an older step."""
    serials = [_serial(path) for path in list_checkpoints(root)]
    return max((s for s in serials if s is not None), default=0) + 1


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently saved complete checkpoints (keep <= 0 keeps all) and stale
    temp folders; the one `latest` names is never deleted."""
    removed = []
    for pattern in (".tmp-step-*", ".old-step-*"):
        for path in Path(root).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    if keep <= 0:
        return removed
    latest = Path(root) / LATEST
    pinned = (Path(root) / latest.read_text().strip()) if latest.is_file() else None
    for path in checkpoints_in_save_order(root)[:-keep]:
        if path != pinned:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# -- loading --------------------------------------------------------------------------------------------


def _load_plain(path: Path) -> Any:
    """torch.load(weights_only=True): tensors and plain python values only; anything else is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise UserError(
            f"{path} holds objects other than tensors and plain python values, which torch.load(weights_only=True) "
            f"refuses{f' ({found})' if found else ''}; it was not written by recpre or was tampered with: "
            "delete that checkpoint folder or set run.resume to another one"
        ) from None


def load_state(folder: Path, rank: int = 0) -> dict[str, Any]:
    """state.pt with this rank's part under "rank" (None when the checkpoint has no state for this rank)."""
    folder = Path(folder)
    state = _load_plain(folder / STATE_FILE)
    if rank != 0:
        state["rank"] = load_rank_state(folder, rank)
    return state


def load_rank_state(folder: Path, rank: int) -> dict[str, Any] | None:
    """The own part of rank `rank` > 0 (rank 0's lives in state.pt); None when the checkpoint has none for it."""
    path = Path(folder) / rank_file(rank)
    return _load_plain(path) if path.is_file() else None


def read_model_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))


def shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Architecture fields (not runtime choices or default recurrence) on which two ModelConfig dicts differ, as 'field saved -> now'."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in NOT_SHAPE:
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"{key} {saved.get(key)!r} (checkpoint) vs {current.get(key)!r} (this run)")
    return diffs


def check_same_shape(folder: Path, current: dict[str, Any]) -> None:
    diffs = shape_differences(read_model_config(folder), current)
    if diffs:
        raise UserError(
            f"checkpoint {folder} holds a different model shape ({'; '.join(diffs)}); "
            "use model.name/model.overrides that match it, or a new run.name / run.resume=never"
        )


class _LazyWeights:
    """A safetensors file as a read-only mapping that reads one tensor per lookup (no full copy in memory)."""

    def __init__(self, file: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(file), framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


def _weights_source(source: str | Path, config: dict[str, Any] | None) -> tuple[Path, bool]:
    """(the safetensors file, or the folder of a sharded checkpoint, that `source` names; whether it is sharded),
    refusing a checkpoint of another model shape when `config` is given."""
    source = Path(source)
    if source.is_file() and source.suffix == ".safetensors":
        return source, False
    folder = resolve_checkpoint(source)
    if config is not None:
        check_same_shape(folder, config)
    if is_sharded_checkpoint(folder):
        return folder, True
    return folder / MODEL_FILE, False


def weights_path(source: str | Path) -> Path:
    """The file open_weights and load_weights read `source` from (a sharded checkpoint: its DCP metadata)."""
    file, sharded = _weights_source(source, None)
    return file / DCP_METADATA if sharded else file


def open_weights(source: str | Path, *, config: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """(file, mapping name -> full tensor) for load_weights' sources, for models that take their weights one
    tensor at a time (sharded): the safetensors file is read lazily. recpre.weights adds other formats."""
    from safetensors import SafetensorError

    file, sharded = _weights_source(source, config)
    if sharded:
        from recpre.sharded_checkpoint import model_weights

        weights = model_weights(file)
        _refuse_adapters_only(weights.keys(), file, file)
        return file / DCP_METADATA, weights
    try:
        return file, _LazyWeights(file)
    except SafetensorError as err:
        raise UserError(
            f"{file} is not a valid safetensors file ({err}); delete that checkpoint or load another"
        ) from None


def load_weights(model: nn.Module, source: str | Path, *, config: dict[str, Any] | None = None) -> Path:
    """Load weights only from a recpre checkpoint or run folder, a `latest` file or a .safetensors file.

    With `config`, a checkpoint of another model shape is refused with the list of differing fields. Other
    formats (a Huginn-0125 folder) go through `recpre.weights.load_initial_weights`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load_model

    file, sharded = _weights_source(source, config)
    if sharded:
        return _load_sharded_weights(model, file)
    try:
        st_load_model(unwrap_model(model), str(file), strict=True)
    except RuntimeError as err:
        _refuse_adapters_only(_LazyWeights(file).keys(), file, file.parent)
        raise UserError(f"weights in {file} do not fit this model ({str(err).splitlines()[0]})") from err
    except SafetensorError as err:
        raise UserError(
            f"{file} is not a valid safetensors file ({err}); it is damaged or was not written by recpre: "
            "delete that checkpoint folder or load another one"
        ) from None
    return file


def _refuse_adapters_only(names: Any, source: Path, folder: Path) -> None:
    """A LoRA run's checkpoint holds adapters only: a tool that needs a whole model says how to get one."""
    if any(".lora_A." in key for key in names):
        raise UserError(
            f"{source} holds LoRA adapters only, not a whole model; write a full checkpoint first with "
            f"evaluate/merge_lora.py --checkpoint {folder} --out DIR, and load DIR"
        ) from None


def _load_sharded_weights(model: nn.Module, folder: Path) -> Path:
    """The whole model from the DCP shards of a sharded run's checkpoint, in this process."""
    from recpre.sharded_checkpoint import model_weights

    weights = model_weights(folder)
    _refuse_adapters_only(weights.keys(), folder, folder)
    try:
        unwrap_model(model).load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise UserError(f"weights in {folder} do not fit this model ({str(err).splitlines()[0]})") from err
    return folder / DCP_METADATA


def resume_differences(folder: Path, settings_yaml: str) -> list[str]:
    """RESUME_KEYS whose value in the checkpoint's settings.yaml differs from `settings_yaml` (this run's)."""
    import yaml

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():  # imported weights carry no settings
        return []
    saved, now = yaml.safe_load(path.read_text(encoding="utf-8")) or {}, yaml.safe_load(settings_yaml) or {}
    diffs = []
    for key in RESUME_KEYS:
        section, leaf = key.split(".")
        if leaf not in (saved.get(section) or {}):
            continue
        before, after = saved[section][leaf], (now.get(section) or {}).get(leaf)
        if before != after:
            diffs.append(f"{key} {before!r} (checkpoint) vs {after!r} (this run)")
    return diffs


def check_resumable(folder: Path, settings_yaml: str) -> None:
    """Refuse, listing every differing key, settings under which `folder` cannot be continued."""
    diffs = resume_differences(folder, settings_yaml)
    if diffs:
        raise UserError(
            f"checkpoint {folder} cannot be continued with these settings ({'; '.join(diffs)}): the data order and "
            "the optimizer state depend on them; set them back, or start a new run (another run.name) with "
            f"run.init_from={folder}"
        )


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, settings) from a checkpoint folder, a run folder, or a `latest` file."""
    from recpre.config import ModelConfig
    from recpre.model import build_model
    from recpre.settings import load_settings

    folder = resolve_checkpoint(path)
    config = ModelConfig.from_dict(read_model_config(folder))
    settings = load_settings(folder / SETTINGS_FILE, [])
    model = build_model(config, device="cpu")
    load_weights(model, folder)
    return model.to(device).eval(), settings
