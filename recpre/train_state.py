"""The state of a run that is not weights: counters and guardrails (`TrainState`), and the registry of every
stateful part (`RunState`) that a checkpoint saves and a resume restores, each in one call.

Parts implement `state_dict()` / `load_state_dict()`. Shared parts (optimizer, train state, the optimizer's
identity) are written once by rank 0 into `state.pt`; per-rank parts (data loader position, RNG) go into each
rank's own file; the weights go into `model.safetensors`, or, for a sharded run, every rank writes its shards of
weights and optimizer state through DCP (recpre/sharded_checkpoint.py), which any world size reads back. New capabilities (adapters, RL state, sharded
optimizer state) register parts instead of growing the driver.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from recpre.async_checkpoint import AsyncSaver, Saved, snapshot
from recpre.checkpoint import MODEL_FILE, load_rank_state, load_state, rng_state, save_checkpoint, set_rng_state
from recpre.errors import UserError
from recpre.guardrails import LossSpikeGuard
from recpre.sharded_checkpoint import is_sharded_checkpoint, local_shards, read_full_state, writes_sharded


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Counters of a run; `micro_batches` counts global micro-batches (all ranks), which key depth and noise."""

    step: int = 0
    tokens: int = 0
    micro_batches: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    guard: LossSpikeGuard = field(default_factory=lambda: LossSpikeGuard(None, 1))

    def record_step(self, tokens: int, *, finite: bool) -> None:
        self.step += 1
        self.tokens += tokens
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1

    def state_dict(self) -> dict[str, Any]:
        keys = ("step", "tokens", "micro_batches", "skipped_steps", "nonfinite_in_a_row")
        return {**{k: getattr(self, k) for k in keys}, "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "tokens", "micro_batches", "skipped_steps", "nonfinite_in_a_row"):
            setattr(self, key, int(state[key]))
        self.guard.load_state_dict(state["guard"])


def upgrade_legacy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 before the component refactor kept the guard beside `progress` and counted
    micro-steps per rank; the global count is that times the world size (resuming needs the same one)."""
    progress = state.get("progress")
    if progress is None or "micro_batches" in progress:
        return state
    progress = dict(progress)
    progress["micro_batches"] = int(progress.pop("micro_steps")) * int(state.get("world_size", 1))
    progress["guard"] = state.get("guard", {"mean": None, "seen": 0, "in_a_row": 0})
    return {**state, "progress": progress}


class OptimizerIdentity:
    """What optimizer state is only valid for (the rule and the parameter grouping): saved, and checked on load."""

    def __init__(self, optim_settings: Any) -> None:
        self.value = {"name": optim_settings.name, "no_decay": list(optim_settings.no_decay)}
        self.source = "?"

    def state_dict(self) -> dict[str, Any]:
        return dict(self.value)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.value:
            raise UserError(
                f"checkpoint {self.source} holds optimizer state for {state} but this run uses {self.value}; "
                f"resume with the same optim.name and optim.no_decay, or start a new run with "
                f"run.init_from={self.source}"
            )


class RngState:
    """The generators a step draws from on this rank (python, torch CPU and the CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.device)

    def load_state_dict_from_world(self, state: dict[str, Any], saved_world_size: int) -> None:
        """At another world size the generators keep this run's fresh per-rank seeding: what a step draws that
        must not change with the world size (depths, initial-state noise) is keyed by (seed, step, global
        micro-batch), not by these streams."""


@dataclass
class RunState:
    """Every stateful part of a run, saved and restored together (one call each).

    The model and the optimizer go through the step backend and the fabric, which gather a sharded run's state
    into one process's format and hand each rank its shards back; the other parts are plain state dicts.
    """

    fabric: Any
    backend: Any  # recpre.step_backends.EagerStep or XlaStep
    model: torch.nn.Module
    optimizer: Any
    model_config: dict[str, Any]
    settings_yaml: str
    root: Path  # RUN/checkpoints
    keep: int
    shared: dict[str, Stateful] = field(default_factory=dict)
    per_rank: dict[str, Stateful] = field(default_factory=dict)
    async_save: bool = False  # checkpoint.async: written by a background thread (recpre/async_checkpoint.py)
    adapters: Any = None  # recpre.lora.LoraAdapters: a LoRA run's weights file holds its adapters only

    def __post_init__(self) -> None:
        self.saver = AsyncSaver(self.fabric) if self.async_save else None

    def save(self, step: int, on_saved: Saved | None = None) -> Path:
        """Write checkpoint `step` (every rank calls this); returns its folder. A sharded run's ranks each write
        their own shards (recpre/sharded_checkpoint.py); the others save the gathered single-file format.

        With `async_save` the state is copied to CPU memory and written in the background: this returns once the
        copy is made, and `wait()` returns once the folder is complete. `on_saved(step, folder)` runs in the
        calling thread when it is (at once for a synchronous save).
        """
        if self.saver is not None:
            self.saver.wait()  # never two saves in flight; the previous one's failure is raised here
        shards, lora = None, {} if self.adapters is None else {"lora": self.adapters.state_dict()}
        select = self.adapters.select if self.adapters is not None else None
        if writes_sharded(self.fabric):
            shards, optimizer = local_shards(self.fabric, self.model, self.optimizer, select=select)
            weights = None
        else:
            full = self.backend.full_state(self.fabric, self.model, self.optimizer)
            weights, optimizer = full["model"], full["optimizer"]
            if select is not None and weights is not None:
                weights = select(weights)
        contents = {
            "model": weights,
            "state": {"optimizer": optimizer, **{name: p.state_dict() for name, p in self.shared.items()}, **lora},
            "rank_state": {name: part.state_dict() for name, part in self.per_rank.items()},
            "shards": shards,
        }
        common = {"model_config": self.model_config, "settings_yaml": self.settings_yaml, "keep": self.keep}
        if self.saver is None:
            path = save_checkpoint(self.root, step, fabric=self.fabric, **common, **contents)
            if on_saved is not None:
                on_saved(step, path)
            return path
        staged = snapshot(contents)
        write = lambda group: save_checkpoint(self.root, step, fabric=group, **common, **staged)  # noqa: E731
        return self.saver.submit(step, self.root, write, on_saved)

    def wait(self) -> Path | None:
        """Block until an asynchronous save in flight is complete (raising its error); None when none is."""
        return self.saver.wait() if self.saver is not None else None

    def restore(self, ckpt: Path) -> bool:
        """Weights and every registered part from `ckpt` (verified by rank 0 before); False when it holds
        weights only (an imported checkpoint: training starts at step 0)."""
        state = load_state(ckpt, 0)  # state.pt once: at 3.5B it holds tens of GB of optimizer state
        saved_world = int(state.get("world_size", self.fabric.world_size))
        same_world = saved_world == self.fabric.world_size
        if same_world and self.fabric.rank != 0:
            state["rank"] = load_rank_state(ckpt, self.fabric.rank)
        state = upgrade_legacy_state(state)
        if self.adapters is not None:  # the base is this run's own (run.init_from); the checkpoint adds adapters
            self.adapters.check(ckpt, state)
        elif "lora" in state:
            raise UserError(
                f"checkpoint {ckpt} holds LoRA adapters only; resume it with the model.lora settings it was trained "
                f"with, or write a full checkpoint first with evaluate/merge_lora.py --checkpoint {ckpt} --out DIR"
            )
        full = None
        if is_sharded_checkpoint(ckpt):  # every rank reads the whole state and keeps its part: any world size
            full = read_full_state(ckpt, state.get("optimizer") or {"param_groups": []})
        if self.adapters is not None:  # written by any strategy, loaded by any: only the adapters are replaced
            saved = self.adapters.read(ckpt, full["model"] if full is not None else None)
            self.fabric.load_full_state_dict(self.model, None, {"model": saved}, source=str(ckpt), strict=False)
        elif full is not None:
            self.fabric.load_full_state_dict(self.model, None, {"model": full["model"]}, source=str(ckpt))
        else:
            self.backend.load_weights(self.fabric, self.model, ckpt / MODEL_FILE)
        if "optimizer" not in state:
            return False
        for name, part in self.shared.items():  # the optimizer's identity is checked before its state loads
            if name in state:
                if hasattr(part, "source"):
                    part.source = str(ckpt)
                part.load_state_dict(state[name])
        saved_optimizer = full["optimizer"] if full is not None else state["optimizer"]
        self.backend.load_optimizer(self.fabric, self.model, self.optimizer, saved_optimizer, str(ckpt))
        if not same_world:
            self._restore_per_rank_from_world(ckpt, state["rank"], saved_world)
            return True
        if state["rank"] is None:
            if self.fabric.is_main:
                message = f"warning: {ckpt} has no state for rank {self.fabric.rank}; its data order restarts"
                print(message, file=sys.stderr)
            return True
        for name, part in self.per_rank.items():
            part.load_state_dict(state["rank"][name])
        return True

    def _restore_per_rank_from_world(self, ckpt: Path, rank0: dict[str, Any], saved_world: int) -> None:
        """Per-rank parts from rank 0's copy, each converted for this world size (or refused where it cannot be
        exact, by the part, in one sentence)."""
        for name, part in self.per_rank.items():
            convert = getattr(part, "load_state_dict_from_world", None)
            if convert is None:
                raise UserError(
                    f"checkpoint {ckpt} was written by {saved_world} ranks but this run has "
                    f"{self.fabric.world_size}, and its {name!r} state cannot be converted to another world size; "
                    f"resume with {saved_world} ranks, or start a new run with run.init_from={ckpt}"
                )
            convert(rank0[name], saved_world)
