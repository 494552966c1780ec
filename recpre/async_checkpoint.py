"""Asynchronous checkpoint saves (`checkpoint.async: true`): training stalls only while the state is copied to
CPU memory; a background thread writes the copy through the same atomic path as a synchronous save
(recpre.checkpoint.save_checkpoint: temporary folder, manifest with sizes and sha256, rename, `latest`, `keep`).

- The copy is a snapshot: every tensor is cloned, so the optimizer steps taken while the thread writes cannot
  change what is written.
- One save at a time: a new save, and every point where the run must have its checkpoint (the final save, a
  signal or time-limit stop, an abort that promises a saved checkpoint), first waits for the one in flight. A
  write that failed (disk full) is raised there, as the CheckpointSaveError a synchronous save would have raised.
- Across ranks the thread's collectives (the save's barriers, DCP's planning) run on a gloo process group of
  their own, so they never interleave with the training loop's collectives on the default group; rank 0 moves
  `latest` only after the last barrier, when every rank's files are written and the manifest verifies.
- A process killed while the thread writes leaves a `.tmp-step-N` folder, never promoted: `latest` still names
  the previous complete checkpoint.
"""

from __future__ import annotations

import copy
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recpre.checkpoint import checkpoint_name

Saved = Callable[[int, Path], None]  # called in the training thread once checkpoint `step` is complete


def snapshot(value: Any, memo: dict | None = None) -> Any:
    """A copy of `value` in CPU memory that later training steps cannot change: every tensor cloned (sharded
    tensors keep their placement, tensors that share memory stay shared), containers rebuilt, the rest deep-copied."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        key = _alias_key(value)
        if key not in memo:
            memo[key] = value.detach().to("cpu", copy=True)  # a DTensor copies its local shard
        return memo[key]
    if isinstance(value, nn.Module):
        return copy.deepcopy(value)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, snapshot(v, memo)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(snapshot(v, memo) for v in value)
    return copy.deepcopy(value)


def _alias_key(t: torch.Tensor) -> tuple:
    """Tensors that view the same memory the same way (a state_dict's tied weights) get one copy."""
    local = t.to_local() if hasattr(t, "to_local") else t
    try:
        where = local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. XLA): copied one by one
        return ("object", id(t))
    if where == 0:
        return ("object", id(t))
    return (where, local.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device), type(t))


class SaveGroup:
    """What save_checkpoint needs of a fabric (rank, world size, barrier), on the saver's own process group."""

    def __init__(self, rank: int, world_size: int, process_group: Any) -> None:
        self.rank, self.world_size, self.process_group = rank, world_size, process_group
        self.is_main = rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.all_reduce(torch.zeros(1), group=self.process_group)


_SAVERS: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


class AsyncSaver:
    """Runs checkpoint writes in a background thread, one at a time. Every rank creates one at the same point of
    the run (with several ranks this creates a process group: a collective)."""

    def __init__(self, fabric: Any) -> None:
        world = getattr(fabric, "world_size", 1)
        group = None
        if dist.is_initialized():  # even at world size 1: DCP would otherwise plan on the loop's default group
            timeout = timedelta(seconds=float(getattr(fabric, "timeout_s", 1800)))
            group = dist.new_group(backend="gloo", timeout=timeout)
        self.group = SaveGroup(getattr(fabric, "rank", 0), world, group)
        self._thread: threading.Thread | None = None
        self._pending: tuple[int, Path, Saved | None] | None = None
        self._error: BaseException | None = None
        _SAVERS.add(self)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def submit(self, step: int, root: Path, write: Callable[[SaveGroup], Path], on_saved: Saved | None) -> Path:
        """Start `write(group)` (a save_checkpoint call on staged state) in the background; returns the folder it
        will write. The caller waits for the previous save first (before staging: one snapshot in memory)."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint save is still in flight: wait() for it before submitting another")
        self._pending = (step, Path(root) / checkpoint_name(step), on_saved)
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return self._pending[1]

    def _run(self, write: Callable[[SaveGroup], Path]) -> None:
        try:
            write(self.group)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            self._error = err

    def wait(self) -> Path | None:
        """Block until the save in flight is complete; returns its folder (None when there was none). Its
        `on_saved` runs here, in the caller's thread; a failed write raises its error here."""
        if self._thread is None:
            return None
        self._thread.join()
        step, path, on_saved = self._pending
        error, self._thread, self._pending, self._error = self._error, None, None, None
        if error is not None:
            raise error
        if on_saved is not None:
            on_saved(step, path)
        return path


def wait_for_saves() -> None:
    """Let a save still in flight finish before the process group closes (a run ending on an error); a failure
    there is reported as a warning, since the run is already failing with its own error."""
    for saver in list(_SAVERS):
        if not saver.in_flight:
            continue
        try:
            saver.wait()
        except BaseException as err:
            print(f"warning: the checkpoint being written when the run stopped is incomplete: {err}", file=sys.stderr)
