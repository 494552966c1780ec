"""One validated `Settings` object per run, built from a YAML file plus command-line overrides.

Order of precedence (later wins): dataclass defaults < `base:` files (root first) < the YAML file < each
`key=value` override. Interpolations (`${oc.env:VAR}`, `${run.name}`) are resolved at load, so a saved
settings file is a complete, literal record of the run. Every mistake a user can make is a `UserError`
naming the key and where it was set; nothing is written while loading.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import keyword
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recpre.config import FUSED_HEADS, ModelConfig
from recpre.errors import UserError
from recpre.lora_targets import check_targets
from recpre.recurrence import CURRICULA, SAMPLING_SCHEMES, STATE_NOISE
from recpre.rl.rewards import BUILTIN_REWARDS
from recpre.settings_schema import (
    ATTENTION_BACKENDS,
    DEFAULT_CONFIG,
    DEVICES,
    OPTIMIZERS,
    PRECISIONS,
    PROGRESS,
    RUNTIME_MODEL_KEYS,
    SCHEDULES,
    SHARD_GROUPS,
    STRATEGIES,
    WANDB_MODES,
    RecurrenceSettings,
    Settings,
)
from recpre.settings_sources import (
    Origins,
    check_env,
    first_line,
    parse_override,
    read_chain,
)

# --------------------------------------------------------------------------------------------------------------
# Key and type checking against the dataclass tree


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_name(key: str) -> str:
    """The dataclass field of a settings key: a key that is a Python keyword (`checkpoint.async`) is spelled
    with a trailing underscore in Python."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _key_name(name: str) -> str:
    """The settings key (as YAML, overrides and messages spell it) of a dataclass field."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _as_keys(node: Any) -> Any:
    """dataclasses.asdict with every field named by its settings key (`async_` -> `async`)."""
    if dataclasses.is_dataclass(node):
        return {_key_name(f.name): _as_keys(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {k: _as_keys(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_as_keys(v) for v in node)
    return copy.deepcopy(node)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    origin = typing.get_origin(inner)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if dataclasses.is_dataclass(inner) or origin is dict or inner is dict:
        text = "a mapping"
    elif origin is list:
        (elem,) = typing.get_args(inner) or (Any,)
        text = "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(elem, "values")
    else:
        text = names.get(inner, getattr(inner, "__name__", str(inner)))
    return f"{text} or null" if optional else text


def _all_keys(cls: type = Settings, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            out += _all_keys(inner, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{_key_name(name)}")
    return out


def _type_at(key: str) -> Any:
    """The declared type of a dotted key (list indices and model.overrides entries map to their container)."""
    tp: Any = Settings
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        inner, _ = _strip_optional(tp)
        if not dataclasses.is_dataclass(inner):
            break
        tp = _hints(inner).get(_field_name(part), Any)
    return tp


def _did_you_mean(key: str, siblings: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return f"; did you mean '{parent}{close[0]}'?"
    everywhere = _all_keys()
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf]
    elsewhere = elsewhere or difflib.get_close_matches(key, everywhere, n=1, cutoff=0.6)
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; known keys here: {', '.join(siblings)}."


def _check_layer(data: Any, cls: type, prefix: str, source: str) -> dict:
    """Unknown keys and non-mapping sections, as errors naming the key; returns a normalized copy."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise UserError(f"{where} in {source} must be a mapping of keys, got {data!r}.")
    hints = {_key_name(name): tp for name, tp in _hints(cls).items()}
    out: dict = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            what = "section" if not prefix else "key"
            raise UserError(f"unknown {what} '{full}' in {source}{_did_you_mean(str(full), list(hints))}")
        tp, key = hints[key], _field_name(key)  # normalized to field names, which the dataclass tree merges
        inner, optional = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            out[key] = _check_layer(value if value is not None else {}, inner, f"{full}.", source)
        elif typing.get_origin(inner) is dict:
            if value is None:
                value = {}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise UserError(f"{full} in {source} must be a mapping of field names to values, got {value!r}.")
            out[key] = dict(value)
        elif inner is int and isinstance(value, float) and value.is_integer():
            out[key] = int(value)  # `max_tokens: 8.0e11` is an integer a human wrote in float notation
        else:
            out[key] = value
    return out


def _merge(cfg: Any, layer: dict, source: str) -> Any:
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as err:
        key = ".".join(_key_name(part) for part in (err.full_key or "?").split("."))
        raise UserError(f"{key} in {source} must be {_describe(_type_at(key))}, got {err.value!r}.") from None


# --------------------------------------------------------------------------------------------------------------
# Validation


def _one_of(value: str, allowed: tuple[str, ...], key: str, where: Origins) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{key} in {where(key)} is {value!r} but must be one of {', '.join(allowed)}{hint}.")


def _require(ok: bool, key: str, where: Origins, message: str) -> None:
    if not ok:
        raise UserError(f"{key} in {where(key)} {message}.")


def _validate(s: Settings, where: Origins) -> None:
    _one_of(s.model.attention, ATTENTION_BACKENDS, "model.attention", where)
    _one_of(s.model.fused_head, FUSED_HEADS, "model.fused_head", where)
    _one_of(s.optim.name, OPTIMIZERS, "optim.name", where)
    _one_of(s.schedule.name, SCHEDULES, "schedule.name", where)
    _one_of(s.fabric.strategy, STRATEGIES, "fabric.strategy", where)
    _one_of(s.fabric.precision, PRECISIONS, "fabric.precision", where)
    _one_of(s.fabric.device, DEVICES, "fabric.device", where)
    _one_of(s.log.progress, PROGRESS, "log.progress", where)
    _one_of(s.log.wandb.mode, WANDB_MODES, "log.wandb.mode", where)

    _require(bool(s.run.name.strip()), "run.name", where, "must not be empty")
    _require(bool(s.run.out_dir.strip()), "run.out_dir", where, "must not be empty")
    _require(s.run.seed >= 0, "run.seed", where, f"must be >= 0, got {s.run.seed}")
    _require(bool(s.run.resume.strip()), "run.resume", where, "must be 'auto', 'never' or a checkpoint path")

    if s.run.init_from and s.run.init_from_optional and not Path(s.run.init_from).exists():
        where.notes.append(f"note: run.init_from {s.run.init_from} does not exist; starting from a fresh init")
        s.run.init_from = None
    _check_data(s, where)
    _check_optim(s, where)
    _check_train(s, where)
    _check_schedule(s, where)
    _check_fabric(s, where)
    _check_lora(s, where)
    _check_rl(s, where)

    _require(s.log.interval >= 1, "log.interval", where, f"must be >= 1, got {s.log.interval}")
    e = s.eval
    _require(e.interval >= 0, "eval.interval", where, f"must be >= 0 (0 = off), got {e.interval}")
    _require(all(x >= 1 for x in e.depths), "eval.depths", where, f"must all be >= 1, got {e.depths}")
    _require(e.max_batches >= 1, "eval.max_batches", where, f"must be >= 1, got {e.max_batches}")
    _require(
        e.micro_batch_size is None or e.micro_batch_size >= 1,
        "eval.micro_batch_size",
        where,
        f"must be >= 1 or null, got {e.micro_batch_size}",
    )
    c = s.checkpoint
    _require(c.interval >= 0, "checkpoint.interval", where, f"must be >= 0 (0 = only at end), got {c.interval}")
    _require(c.keep >= 1, "checkpoint.keep", where, f"must be >= 1, got {c.keep}")
    _require(c.save_before_end_min >= 0, "checkpoint.save_before_end_min", where, "must be >= 0 (0 = off)")


def _check_lora(s: Settings, where: Origins) -> None:
    """LoRA settings (docs/lora.md); only checked when LoRA is on (rank > 0)."""
    lo = s.model.lora
    _require(lo.rank >= 0, "model.lora.rank", where, f"must be >= 0 (0 = no LoRA), got {lo.rank}")
    if lo.rank == 0:
        return
    _require(lo.alpha > 0, "model.lora.alpha", where, f"must be > 0, got {lo.alpha}")
    _require(0 <= lo.dropout < 1, "model.lora.dropout", where, f"must be in [0, 1), got {lo.dropout}")
    _require(lo.per_iteration >= 0, "model.lora.per_iteration", where, f"must be >= 0, got {lo.per_iteration}")
    _require(bool(lo.targets), "model.lora.targets", where, "must name at least one target (e.g. [all])")
    try:
        check_targets(lo.targets, f"model.lora.targets in {where('model.lora.targets')}")
    except UserError as err:
        raise UserError(f"{err}.") from None
    if lo.quantize is not None:
        _one_of(lo.quantize, ("4bit",), "model.lora.quantize", where)
    _require(
        s.fabric.strategy != "xla",
        "fabric.strategy",
        where,
        "is 'xla', which LoRA does not support yet; use single, simple-ddp, torch-ddp, fsdp or hsdp with model.lora",
    )
    _require(
        lo.quantize is None or s.fabric.strategy not in ("fsdp", "hsdp"),
        "model.lora.quantize",
        where,
        f"is {lo.quantize!r}, which fabric.strategy={s.fabric.strategy} cannot shard (a 4-bit base is not built on "
        "the meta device); remove model.lora.quantize or use single, simple-ddp or torch-ddp",
    )
    _require(
        s.fabric.precision != "bf16-true" or s.fabric.strategy not in ("fsdp", "hsdp"),
        "fabric.precision",
        where,
        f"is 'bf16-true', under which fabric.strategy={s.fabric.strategy} casts a LoRA run's base to bf16 before "
        "run.init_from loads, so its hash would not match the base merge_lora and other strategies rebuild; use "
        "fabric.precision=bf16-mixed",
    )


def _check_data(s: Settings, where: Origins) -> None:
    """Data sources and mixture weights."""
    d = s.data
    _require(d.prefetch >= 0, "data.prefetch", where, f"must be >= 0, got {d.prefetch}")
    _one_of(d.format, ("packed", "chat"), "data.format", where)
    _one_of(s.train.loss_on, ("assistant", "all"), "train.loss_on", where)
    if d.weights is not None:
        _require(bool(d.train), "data.weights", where, "needs data.train sources to weight (it is empty)")
        _require(
            len(d.weights) == len(d.train),
            "data.weights",
            where,
            f"has {len(d.weights)} entries but data.train has {len(d.train)} sources",
        )
        _require(all(w > 0 for w in d.weights), "data.weights", where, f"must all be > 0, got {d.weights}")


def _check_optim(s: Settings, where: Origins) -> None:
    """Optimizer hyperparameters."""
    o = s.optim
    _require(o.lr > 0, "optim.lr", where, f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", where, f"must be >= 0, got {o.weight_decay}")
    _require(0 <= o.beta1 < 1, "optim.beta1", where, f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optim.beta2", where, f"must be in [0, 1), got {o.beta2}")
    _require(o.eps > 0, "optim.eps", where, f"must be > 0, got {o.eps}")
    _require(o.muon_lr is None or o.muon_lr > 0, "optim.muon_lr", where, f"must be > 0 or null, got {o.muon_lr}")


def _check_train(s: Settings, where: Origins) -> None:
    """Batch sizes, budgets, guardrails and the recurrence policy."""
    t = s.train
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", where, f"must be >= 1, got {t.micro_batch_size}")
    _require(t.world_batch_size >= 1, "train.world_batch_size", where, f"must be >= 1, got {t.world_batch_size}")
    _require(
        t.world_batch_size % t.micro_batch_size == 0,
        "train.world_batch_size",
        where,
        f"({t.world_batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    _require(
        t.max_steps is not None or t.max_tokens is not None,
        "train.max_steps",
        where,
        "and train.max_tokens are both unset; set at least one of them",
    )
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", where, f"must be >= 1, got {t.max_steps}")
    _require(t.max_tokens is None or t.max_tokens >= 1, "train.max_tokens", where, f"must be >= 1, got {t.max_tokens}")
    _require(t.grad_clip >= 0, "train.grad_clip", where, f"must be >= 0 (0 = off), got {t.grad_clip}")
    _require(
        t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", where, f"must be >= 1, got {t.max_nonfinite_steps}"
    )
    _require(
        t.loss_spike_factor is None or t.loss_spike_factor > 1,
        "train.loss_spike_factor",
        where,
        f"must be > 1 or null (off), got {t.loss_spike_factor}",
    )
    _require(
        t.loss_spike_patience >= 1, "train.loss_spike_patience", where, f"must be >= 1, got {t.loss_spike_patience}"
    )

    _check_recurrence(t.recurrence, where)


def _check_schedule(s: Settings, where: Origins) -> None:
    """Learning-rate schedule and batch-size ramp, against the step budget."""
    t, o = s.train, s.optim
    sc = s.schedule
    _require(sc.warmup_steps >= 0, "schedule.warmup_steps", where, f"must be >= 0, got {sc.warmup_steps}")
    _require(sc.cooldown_steps >= 0, "schedule.cooldown_steps", where, f"must be >= 0, got {sc.cooldown_steps}")
    _require(0 <= sc.min_lr <= o.lr, "schedule.min_lr", where, f"({sc.min_lr}) must be between 0 and optim.lr ({o.lr})")
    _check_step_budget(s, t.max_steps, where, "train.max_steps")
    _require(sc.batch_size_ramp >= 0, "schedule.batch_size_ramp", where, f"must be >= 0, got {sc.batch_size_ramp}")
    if sc.batch_size_ramp > 0 and sc.ramp_start_batch_size != 0:
        start = sc.ramp_start_batch_size
        _require(
            0 < start <= t.world_batch_size,
            "schedule.ramp_start_batch_size",
            where,
            f"({start}) must be between 1 and train.world_batch_size ({t.world_batch_size})",
        )
        _require(
            start % t.micro_batch_size == 0,
            "schedule.ramp_start_batch_size",
            where,
            f"({start}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})",
        )
    _require(
        sc.ramp_start_batch_size >= 0,
        "schedule.ramp_start_batch_size",
        where,
        f"must be >= 0 (0 = one micro-batch per rank), got {sc.ramp_start_batch_size}",
    )


def _check_recurrence(r: RecurrenceSettings, where: Origins) -> None:
    key = "train.recurrence"
    if r.sampling is not None:
        _one_of(r.sampling, SAMPLING_SCHEMES, f"{key}.sampling", where)
    _one_of(r.state_noise, STATE_NOISE, f"{key}.state_noise", where)
    _require(r.mean is None or r.mean >= 1, f"{key}.mean", where, f"must be >= 1 or null, got {r.mean}")
    _require(
        r.backprop_depth is None or r.backprop_depth >= 1,
        f"{key}.backprop_depth",
        where,
        f"must be >= 1 or null (the core needs a gradient), got {r.backprop_depth}",
    )
    c = r.curriculum
    _one_of(c.name, CURRICULA, f"{key}.curriculum.name", where)
    _require(c.steps >= 0, f"{key}.curriculum.steps", where, f"must be >= 0, got {c.steps}")
    for name in ("start_mean", "start_backprop_depth"):
        value = getattr(c, name)
        _require(value is None or value >= 1, f"{key}.curriculum.{name}", where, f"must be >= 1 or null, got {value}")
    if c.name != "constant":
        _require(c.steps >= 1, f"{key}.curriculum.steps", where, f"must be >= 1 for the {c.name} curriculum")
        _require(
            c.start_mean is not None or c.start_backprop_depth is not None,
            f"{key}.curriculum.start_mean",
            where,
            f"or start_backprop_depth must be set: the {c.name} curriculum ramps from them to the targets",
        )


RL_DEPTHS = ("fixed", "sampled")


def _check_rl(s: Settings, where: Origins) -> None:
    """train.objective and the rl section (checked whatever the objective, so a typo never waits for a run)."""
    _one_of(s.train.objective, ("pretrain", "grpo"), "train.objective", where)
    r = s.rl
    if r.depth == "adaptive":
        raise UserError(
            f"rl.depth in {where('rl.depth')} is 'adaptive', which is for evaluation only (the update must "
            "recompute each token at the depth it was sampled at); use fixed or sampled and set rl.eval_adaptive"
        )
    _one_of(r.depth, RL_DEPTHS, "rl.depth", where)
    _require(
        r.group_size >= 2, "rl.group_size", where, f"must be >= 2 (advantages compare a group), got {r.group_size}"
    )
    _require(r.max_new_tokens >= 1, "rl.max_new_tokens", where, f"must be >= 1, got {r.max_new_tokens}")
    _require(r.temperature > 0, "rl.temperature", where, f"must be > 0 (rollouts are sampled), got {r.temperature}")
    _require(0 < r.top_p <= 1, "rl.top_p", where, f"must be in (0, 1], got {r.top_p}")
    _require(r.kl_coef >= 0, "rl.kl_coef", where, f"must be >= 0, got {r.kl_coef}")
    _require(0 < r.clip_eps < 1, "rl.clip_eps", where, f"must be in (0, 1), got {r.clip_eps}")
    _require(r.updates_per_rollout >= 1, "rl.updates_per_rollout", where, f"must be >= 1, got {r.updates_per_rollout}")
    _require(r.depth_value is None or r.depth_value >= 1, "rl.depth_value", where, f"must be >= 1, got {r.depth_value}")
    _require(bool(r.eval_depths) and all(d >= 1 for d in r.eval_depths), "rl.eval_depths", where,
             f"must be a non-empty list of depths >= 1, got {r.eval_depths}")  # fmt: skip
    _require(r.eval_samples >= 0, "rl.eval_samples", where, f"must be >= 0 (0 = off), got {r.eval_samples}")
    _require(r.eval_max_prompts >= 1, "rl.eval_max_prompts", where, f"must be >= 1, got {r.eval_max_prompts}")
    builtin = ", ".join(BUILTIN_REWARDS)
    _require(":" in r.reward or r.reward in BUILTIN_REWARDS, "rl.reward", where,
             f"is {r.reward!r}: name a built-in ({builtin}) or 'module:function'")  # fmt: skip
    if s.train.objective == "grpo" and s.train.loss_spike_factor is not None:
        if where.layer("train.loss_spike_factor") >= 0:  # set in a file or override, not the default
            where.notes.append("note: train.loss_spike_factor does not apply to train.objective grpo (its loss "
                               "is centred near 0); the loss guard is off")  # fmt: skip
        s.train.loss_spike_factor = None
    if s.train.objective == "grpo":
        _require(s.train.max_tokens is None, "train.max_tokens", where,
                 "does not apply to train.objective grpo (completion lengths vary); set train.max_steps")  # fmt: skip


def _check_fabric(s: Settings, where: Origins) -> None:
    """Fabric options, and sharding options that cannot work together, refused before the run folder exists."""
    f, sharded = s.fabric, s.fabric.strategy in ("fsdp", "hsdp")
    _require(f.chunk_mb > 0, "fabric.chunk_mb", where, f"must be > 0, got {f.chunk_mb}")
    _require(f.timeout_s >= 1, "fabric.timeout_s", where, f"must be >= 1, got {f.timeout_s}")
    if f.strategy == "xla":
        _require(
            f.device in ("auto", "xla"), "fabric.device", where, "must be 'auto' or 'xla' with fabric.strategy xla"
        )
    _one_of(f.shard_group, SHARD_GROUPS, "fabric.shard_group", where)
    need = "needs fabric.strategy simple-ddp (fsdp and hsdp shard the optimizer state already)"
    _require(not f.optimizer_sharding or f.strategy == "simple-ddp", "fabric.optimizer_sharding", where, need)
    _require(
        f.shard_size is None or f.strategy == "hsdp", "fabric.shard_size", where, "applies to fabric.strategy hsdp only"
    )
    _require(f.shard_size is None or f.shard_size >= 1, "fabric.shard_size", where, f"must be >= 1, got {f.shard_size}")
    _require(not f.offload or sharded, "fabric.offload", where, "needs fabric.strategy fsdp or hsdp")
    _require(not f.offload or f.device != "cpu", "fabric.offload", where, "moves GPU memory to the CPU: it needs a GPU")
    muon = "is muon, which orthogonalises whole matrices: use optim.name adamw or ellis-adam with fabric.strategy"
    _require(not (sharded and s.optim.name == "muon"), "optim.name", where, f"{muon} {f.strategy}")


def _check_step_budget(s: Settings, steps: int | None, where: Origins, key: str) -> None:
    """Warmup, cooldown and batch ramp must fit the run. When the step budget was set after them (a smoke run:
    `train.max_steps=50` over a config made for thousands of steps), they are shortened to fit, with a note;
    when they were set with or after the budget, the contradiction is the user's to resolve."""
    sc = s.schedule
    if steps is None:
        return
    budget_later = where.layer(key) > max(where.layer("schedule.warmup_steps"), where.layer("schedule.cooldown_steps"))
    if sc.warmup_steps + sc.cooldown_steps > steps and budget_later:
        total = sc.warmup_steps + sc.cooldown_steps
        warmup, cooldown = sc.warmup_steps * steps // total, sc.cooldown_steps * steps // total
        where.notes.append(
            f"note: the {steps} steps of {key} are fewer than schedule.warmup_steps ({sc.warmup_steps}) plus "
            f"schedule.cooldown_steps ({sc.cooldown_steps}); shortened to {warmup} and {cooldown} steps"
        )
        sc.warmup_steps, sc.cooldown_steps = warmup, cooldown
    if sc.batch_size_ramp > steps and where.layer(key) > where.layer("schedule.batch_size_ramp"):
        where.notes.append(
            f"note: the {steps} steps of {key} are fewer than schedule.batch_size_ramp ({sc.batch_size_ramp}); "
            f"the ramp is shortened to {steps} steps"
        )
        sc.batch_size_ramp = steps
    _require(
        sc.warmup_steps + sc.cooldown_steps <= steps,
        "schedule.warmup_steps",
        where,
        f"({sc.warmup_steps}) plus schedule.cooldown_steps ({sc.cooldown_steps}) exceeds the {steps} steps "
        f"of {key} (set in {where(key)})",
    )
    _require(
        sc.batch_size_ramp <= steps,
        "schedule.batch_size_ramp",
        where,
        f"({sc.batch_size_ramp}) exceeds the {steps} steps of {key} (set in {where(key)})",
    )


def _check_model(s: Settings, where: Origins) -> None:
    for key in (*RUNTIME_MODEL_KEYS, "name"):
        _require(
            key not in s.model.overrides,
            f"model.overrides.{key}",
            where,
            f"duplicates a model setting; set model.{key} instead",
        )
    try:
        cfg = ModelConfig.from_name(s.model.name, **_runtime_fields(s), **s.model.overrides)
    except (UserError, TypeError, ValueError) as err:
        message = str(err)
        source = where("model.name")
        if not message.startswith("model.name"):
            named = [k for k in s.model.overrides if re.search(rf"\b{re.escape(k)}\b", message)]
            if named:
                source = where(f"model.overrides.{named[0]}")
            elif s.model.overrides:
                source = where("model.overrides")
        raise UserError(f"In {source}, {message}") from None
    t = s.train
    if t.max_steps is None and t.max_tokens is not None:
        tokens_per_step = t.world_batch_size * cfg.block_size
        steps = t.max_tokens // tokens_per_step
        _require(
            steps >= 1,
            "train.max_tokens",
            where,
            f"({t.max_tokens}) is less than one step of {tokens_per_step} tokens (world batch x block size)",
        )
        _check_step_budget(s, steps, where, "train.max_tokens")


# --------------------------------------------------------------------------------------------------------------
# Public API


def load_settings(
    config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, mark_unset_env: bool = False
) -> Settings:
    """Defaults < base files < YAML < overrides, resolved and validated; raises UserError on any bad input.

    mark_unset_env: for showing a config (`--print-config`) on a machine without the run's environment, a
    `${oc.env:VAR}` whose VAR is unset resolves to `unset_marker(VAR)` with a note, instead of an error.
    """
    if isinstance(overrides, str):
        raise TypeError("load_settings takes overrides as a list of 'key=value' strings, not one string")
    path = DEFAULT_CONFIG if config_path is None else Path(config_path)
    where = Origins()
    cfg = OmegaConf.structured(Settings)
    for source, data in read_chain(path):
        layer = _check_layer(data, Settings, "", source)
        cfg = _merge(cfg, layer, source)
        where.record(layer, source)
    command_line = where.next_layer()  # all overrides: one layer, after every file
    for item in overrides:
        source = f"command-line override '{item}'"
        layer = _check_layer(parse_override(item), Settings, "", source)
        cfg = _merge(cfg, layer, source)
        where.record(layer, source, layer=command_line)

    missing = check_env(OmegaConf.to_container(cfg, resolve=False), where, mark_missing=mark_unset_env)
    try:
        os.environ.update(missing)
        settings = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = err.full_key or "?"
        raise UserError(f"{key} in {where(key)} could not be resolved: {first_line(err)}.") from None
    finally:
        for var in missing:
            os.environ.pop(var, None)
    assert isinstance(settings, Settings)
    _validate(settings, where)
    _check_model(settings, where)
    object.__setattr__(settings, "_origins", where)
    return settings


def settings_notes(settings: Settings) -> list[str]:
    """Lines saying what loading adjusted (e.g. a schedule shortened to fit a short run); print them once."""
    where: Origins | None = getattr(settings, "_origins", None)
    return list(where.notes) if where is not None else []


def validate_for_world(settings: Settings, world_size: int) -> None:
    """Checks that need the world size, which only the fabric knows: batches must split evenly over ranks."""
    where: Origins = getattr(settings, "_origins", None) or Origins()
    t, sc = settings.train, settings.schedule
    per_step = t.micro_batch_size * world_size
    _require(
        t.world_batch_size % per_step == 0,
        "train.world_batch_size",
        where,
        f"({t.world_batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size}) "
        f"x world size ({world_size}) = {per_step}",
    )
    _require(
        settings.eval.max_batches % world_size == 0,
        "eval.max_batches",
        where,
        f"({settings.eval.max_batches}) must be a multiple of the world size ({world_size}), "
        "so every rank validates the same number of batches",
    )
    size = settings.fabric.shard_size
    if settings.fabric.strategy == "hsdp" and size is not None:
        _require(
            world_size % size == 0, "fabric.shard_size", where, f"({size}) must divide the world size ({world_size})"
        )
    if sc.batch_size_ramp > 0 and sc.ramp_start_batch_size:
        _require(
            sc.ramp_start_batch_size % per_step == 0,
            "schedule.ramp_start_batch_size",
            where,
            f"({sc.ramp_start_batch_size}) must be a multiple of train.micro_batch_size x world size = {per_step}",
        )


def _runtime_fields(settings: Settings) -> dict[str, Any]:
    return {key: getattr(settings.model, key) for key in RUNTIME_MODEL_KEYS}


def model_config(settings: Settings) -> Any:
    """The ModelConfig a run builds: the named shape, model.overrides, and the runtime model choices."""
    return ModelConfig.from_name(settings.model.name, **_runtime_fields(settings), **settings.model.overrides)


def _escape(node: Any) -> Any:
    """Literal `${` in a resolved value must stay literal when the file is loaded again."""
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    if isinstance(node, str):
        return node.replace("${", "\\${")
    return node


class _Dumper(yaml.SafeDumper):
    """Mappings in block style, lists inline: the saved file reads like the launch configs."""

    def represent_list(self, data: list) -> yaml.Node:
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _Dumper.represent_list)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """The settings as nested plain values (e.g. wandb's config, so runs can be filtered by optim.lr)."""
    return _as_keys(settings)


def settings_to_yaml(settings: Settings) -> str:
    body = yaml.dump(_escape(settings_to_dict(settings)), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return "# Resolved recpre settings: load_settings(this_file, []) reproduces them exactly.\n" + body


def save_settings(settings: Settings, path: str | Path) -> None:
    """Write the resolved YAML atomically, so a crash never leaves a half-written settings file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(settings_to_yaml(settings))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
