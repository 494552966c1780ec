"""ModelConfig: every architectural field of GPT and RecurrentGPT, plus derived sizes.

A config is plain data (serialisable with `to_dict` / `from_dict`), validated on construction so that an
impossible shape is a `UserError` before any weight is allocated. Parameter counts and FLOPs are computed from
the fields alone, so a 3.5B shape can be sized on a laptop.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from recpre.errors import UserError
from recpre.recurrence import SAMPLING_SCHEMES

ARCHITECTURES = ("gpt", "recurrent")
BLOCK_KINDS = ("pre", "post", "sandwich")
INJECTIONS = ("linear", "add")
STATE_INITS = ("like-init", "zero")
# Fields that do not change the function the weights compute: runtime choices, and a shape's default recurrence
# (what training samples is `train.recurrence`, recpre/recurrence.py). Checkpoints load whatever they are.
RUNTIME_FIELDS = ("name", "attention", "fused_head", "activation_checkpointing")
RECURRENCE_DEFAULTS = ("mean_recurrence", "mean_backprop_depth", "sampling_scheme", "lockstep")
# takase: std sqrt(2/(5h)), truncated normal; scaled: std 0.02 (GPT baselines); scaled-orthogonal: the Huginn
# reference's "scaled" init with init_orthogonal (std sqrt(2/(5h)), orthogonal matrices; pair it with embedding
# scale 1, as the reference does). Output projections use std / sqrt(2 * effective_depth) in all three.
INIT_STRATEGIES = ("takase", "scaled", "scaled-orthogonal")
FUSED_HEADS = ("none", "chunked")


@dataclass
class ModelConfig:
    """The shape of a model. Field names are stable: checkpoints store them (`model_config.json`)."""

    name: str = "custom"
    architecture: str = "recurrent"  # "gpt" | "recurrent"
    block_size: int = 256  # context length the model is trained at
    vocab_size: int = 4096
    padding_multiple: int = 64  # embedding rows are padded to a multiple of this
    n_embd: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    intermediate_size: int = 352  # gated MLP: fc h -> 2I, proj I -> h
    n_layers: int = 4  # gpt only
    n_layers_prelude: int = 1  # recurrent only
    n_layers_core: int = 2  # recurrent only: blocks in the looped core
    n_layers_coda: int = 1  # recurrent only
    block_kind: str = "sandwich"  # "pre" | "post" | "sandwich"
    norm_eps: float = 1e-6
    injection: str = "linear"  # "linear": adapter(concat(state, emb)); "add": state + emb
    state_init: str = "like-init"  # "like-init" (random, redrawn every forward) | "zero"
    mean_recurrence: int = 4
    mean_backprop_depth: int = 2
    sampling_scheme: str = "poisson-lognormal-filling"
    lockstep: bool = True  # all ranks draw the same depth
    rope_base: float = 50000.0
    qk_bias: bool = True  # learnable q/k bias [2, 1, heads, head_dim], added before RoPE
    bias: bool = False  # biases in every linear layer
    tie_embeddings: bool = True
    init_strategy: str = "takase"  # "takase" | "scaled" | "scaled-orthogonal"
    embedding_scale: float | None = None  # None = sqrt(n_embd)
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    # runtime choices (do not change the function the weights compute)
    attention: str = "auto"
    fused_head: str = "none"  # "none" | "chunked"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A registry shape with `overrides` applied (unknown names and fields are UserErrors)."""
        from recpre.model_registry import MODELS

        if name not in MODELS:
            close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
            hint = f" did you mean {', '.join(close)}?" if close else f" known: {', '.join(sorted(MODELS))}."
            raise UserError(f"model.name: unknown model '{name}';{hint}")
        values = {**MODELS[name], "name": name}
        _check_keys(overrides, "model.overrides")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        _check_keys(d, "model config")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- derived ------------------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.padding_multiple)
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def emb_scale(self) -> float:
        return math.sqrt(self.n_embd) if self.embedding_scale is None else float(self.embedding_scale)

    @property
    def is_recurrent(self) -> bool:
        return self.architecture == "recurrent"

    @property
    def n_blocks(self) -> int:
        """Distinct transformer blocks (weights), not their applications."""
        if self.is_recurrent:
            return self.n_layers_prelude + self.n_layers_core + self.n_layers_coda
        return self.n_layers

    @property
    def effective_depth(self) -> int:
        """Blocks applied in one forward at the mean recurrence (sets the output-projection init scale)."""
        if self.is_recurrent:
            return self.n_layers_prelude + self.n_layers_coda + self.n_layers_core * self.mean_recurrence
        return self.n_layers

    @property
    def init_std(self) -> float:
        if self.init_strategy in ("takase", "scaled-orthogonal"):
            return math.sqrt(2 / (5 * self.n_embd))
        return 0.02

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.effective_depth)

    def block_params(self) -> int:
        h, hd, bias = self.n_embd, self.head_dim, int(self.bias)
        qkv_out = (self.n_heads + 2 * self.kv_heads) * hd
        attn = h * qkv_out + bias * qkv_out + (self.n_heads * hd) * h + bias * h
        if self.qk_bias:
            attn += 2 * self.n_heads * hd
        mlp = h * 2 * self.intermediate_size + bias * 2 * self.intermediate_size
        mlp += self.intermediate_size * h + bias * h
        norms = (4 if self.block_kind == "sandwich" else 2) * h
        return attn + mlp + norms

    def adapter_params(self) -> int:
        if not self.is_recurrent or self.injection != "linear":
            return 0
        return 2 * self.n_embd * self.n_embd + int(self.bias) * self.n_embd

    def num_params(self) -> int:
        """Exact trainable parameter count (tied embeddings counted once), computed without allocating."""
        emb = self.padded_vocab_size * self.n_embd
        head = 0 if self.tie_embeddings else self.padded_vocab_size * self.n_embd
        return emb + head + self.n_blocks * self.block_params() + self.adapter_params() + self.n_embd

    def flops_per_token(self, num_steps: int | tuple[int, int] | None = None, *, training: bool = True) -> float:
        """Matmul FLOPs per token at a recurrence depth (None = mean_recurrence; (n, k) = n no-grad + k grad).

        Forward = 2 x (matmul weights applied) + attention scores/values at the full context (4 x S x h per
        block); a training step triples the forward of everything that gets gradients (prelude, the k grad
        iterations, coda, head) and runs the n no-grad iterations forward only. GPT ignores num_steps.
        """
        h, s = self.n_embd, self.block_size
        block_fwd = 2 * (self.block_params() - (4 if self.block_kind == "sandwich" else 2) * h) + 4 * s * h
        head_fwd = 2 * self.padded_vocab_size * h
        if not self.is_recurrent:
            fwd = self.n_layers * block_fwd + head_fwd
            return float(3 * fwd if training else fwd)
        if num_steps is None:
            n, k = (0, self.mean_recurrence) if not training else _split(self.mean_recurrence, self.mean_backprop_depth)
        elif isinstance(num_steps, int):
            n, k = (0, num_steps) if not training else _split(num_steps, self.mean_backprop_depth)
        else:
            n, k = num_steps
        outer = (self.n_layers_prelude + self.n_layers_coda) * block_fwd + head_fwd
        step = self.n_layers_core * block_fwd + 2 * (self.adapter_params() - int(self.bias) * h)
        if not training:
            return float(outer + (n + k) * step)
        return float(3 * outer + n * step + 3 * k * step)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"model config '{self.name}': {key} {why}.")

        self._check_types(bad)

        for key, choices in (
            ("architecture", ARCHITECTURES),
            ("block_kind", BLOCK_KINDS),
            ("injection", INJECTIONS),
            ("state_init", STATE_INITS),
            ("sampling_scheme", SAMPLING_SCHEMES),
            ("init_strategy", INIT_STRATEGIES),
            ("fused_head", FUSED_HEADS),
        ):
            if getattr(self, key) not in choices:
                raise bad(key, f"is '{getattr(self, key)}'; choose one of {', '.join(choices)}")
        for key in ("block_size", "vocab_size", "n_embd", "n_heads", "intermediate_size", "padding_multiple"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("n_layers", "n_layers_prelude", "n_layers_core", "n_layers_coda", "mean_backprop_depth"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise bad(key, f"must be a non-negative integer, got {getattr(self, key)!r}")
        if (
            self.architecture == "recurrent"
            and self.sampling_scheme != "non-recurrent"
            and self.mean_backprop_depth < 1
        ):
            raise bad("mean_backprop_depth", "must be >= 1 for a recurrent model, or the core never gets a gradient")
        if not isinstance(self.mean_recurrence, int) or self.mean_recurrence < 1:
            raise bad("mean_recurrence", f"must be a positive integer, got {self.mean_recurrence!r}")
        if self.n_embd % self.n_heads:
            raise bad("n_embd", f"({self.n_embd}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise bad("n_heads", f"gives an odd head_dim ({self.head_dim}); RoPE needs an even one")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise bad("n_kv_heads", f"({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.qk_bias and self.kv_heads != self.n_heads:
            raise bad("qk_bias", "needs n_kv_heads == n_heads (the bias has one row per query head)")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise bad("norm_eps/rope_base", "must be positive")
        if self.architecture == "gpt" and self.n_layers < 1:
            raise bad("n_layers", "must be at least 1 for a gpt model")
        if self.is_recurrent and self.n_layers_core < 1:
            raise bad("n_layers_core", "must be at least 1 for a recurrent model")
        for key in ("bos_id", "eos_id", "pad_id"):
            v = getattr(self, key)
            if v is not None and not (0 <= v < self.padded_vocab_size):
                raise bad(key, f"({v}) must lie in [0, padded vocab {self.padded_vocab_size})")

    def _check_types(self, bad) -> None:
        """YAML hands over strings like '1e-5' and ints for floats: coerce what is unambiguous, reject the rest."""
        for f in fields(self):
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if "float" in kinds and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                    continue
                except (TypeError, ValueError):
                    pass
            elif _is_kind(value, kinds):
                continue
            raise bad(f.name, f"must be of type {str(f.type)}, got {value!r}")


def _is_kind(value: Any, kinds: list[str]) -> bool:
    if isinstance(value, bool):
        return "bool" in kinds
    return ("int" in kinds and isinstance(value, int)) or ("str" in kinds and isinstance(value, str))


def _split(r: int, backprop: int) -> tuple[int, int]:
    return max(r - backprop, 0), min(backprop, r)


_FIELD_NAMES = None


def field_names() -> list[str]:
    global _FIELD_NAMES
    if _FIELD_NAMES is None:
        _FIELD_NAMES = [f.name for f in fields(ModelConfig)]
    return _FIELD_NAMES


def _check_keys(d: dict[str, Any], where: str) -> None:
    known = field_names()
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{where}: unknown model field '{key}';{hint}")
