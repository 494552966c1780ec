"""GPT and RecurrentGPT (prelude -> looped core -> coda), their blocks, the depth sampler and a KV cache.

RecurrentGPT with `block_kind="sandwich"`, `injection="linear"` computes exactly the function of the public
Huginn-0125 model (see tests/fixtures/huginn-tiny/README.md for the conventions):

    e = wte(ids) * emb_scale; e = prelude(e); s = s0
    repeat r times: s = core(adapter(concat([s, e], -1)))      (injection "add": core(s + e))
    x = ln_f(s); x = coda(x); x = ln_f(x)  (same weights twice); logits = x @ wte.T (tied)

Parameter names equal the Huginn checkpoint names (`transformer.wte.weight`, `transformer.prelude.<i>.*`,
`transformer.core_block.<i>.*`, `transformer.coda.<i>.*`, `transformer.adapter.weight`, `transformer.ln_f.weight`;
GPT: `transformer.h.<i>.*`), with block parameters `norm_{1..4}.weight`, `attn.Wqkv.weight`, `attn.qk_bias`,
`attn.proj.weight`, `mlp.fc.weight`, `mlp.proj.weight` (plus `.bias` when config.bias). A tied model has no
`lm_head` parameter (the head reads `transformer.wte.weight`); an untied one has `lm_head.weight`.
Norm slots by block kind: sandwich uses norm_1..norm_4; pre-norm norm_1 (before attn) and norm_3 (before mlp);
post-norm norm_2 (after attn residual) and norm_4 (after mlp residual).

Labels are aligned with the inputs (labels[b, t] is the target of position t; the loader shifts them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recpre import attention
from recpre.config import ModelConfig
from recpre.ops import IGNORE_INDEX
from recpre.unwrap import plain_parameter_name


@dataclass
class ModelOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None  # [batch, seq, padded_vocab], float32; None when labels were given
    state: Tensor | None = None  # RecurrentGPT: the recurrent state after the last iteration (before ln_f)


class KVCache:
    """Keys and values for incremental decoding, one entry per block application.

    Keys: ("prelude", 0, i), ("core", step, i) for core block i at recurrence step `step`, ("coda", 0, i),
    and ("h", 0, i) for GPT blocks. Tensors are stored after RoPE as [batch, kv_heads, tokens, head_dim].
    `offset` counts the tokens already in the cache; the model uses it as the RoPE position of the next token
    and calls `advance(seq)` at the end of each forward. Strict by default: every call must run the same
    recurrence steps (a step missing for earlier tokens is an error); per-token adaptive depth overrides
    `past(key)` to say which keys/values stand in for missing ones.
    """

    def __init__(self) -> None:
        self.keys: dict[Hashable, Tensor] = {}
        self.values: dict[Hashable, Tensor] = {}
        self.offset = 0
        # Positions [keys] the last `update` returned when it returned fewer than offset + new tokens (a lookup
        # that skips missing entries); None when it returned all of them. Attention subsets its key mask with it.
        self.kept: Tensor | None = None

    def past(self, key: Hashable) -> tuple[Tensor, Tensor] | None:
        """Cached keys/values for `key` covering the `offset` earlier tokens (None when there are none)."""
        if key not in self.keys:
            if self.offset:
                raise ValueError(f"KV cache has no entry for {key} but holds {self.offset} tokens")
            return None
        k, v = self.keys[key], self.values[key]
        if k.shape[-2] != self.offset:
            raise ValueError(f"KV cache entry {key} holds {k.shape[-2]} tokens, expected {self.offset}")
        return k, v

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past = self.past(key)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        self.keys[key], self.values[key] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.offset += n

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.offset = 0

    def __len__(self) -> int:
        return self.offset


@dataclass
class _Ctx:
    """Per-forward inputs every block needs."""

    cos: Tensor
    sin: Tensor
    attn_fn: object
    doc_ids: Tensor | None
    cache: KVCache | None


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin [batch or 1, seq, 1, head_dim/2] in float32 for integer positions [seq] or [batch, seq]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    if positions.dim() == 1:
        positions = positions[None]
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [batch, seq, heads, head_dim], in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
        self.Wqkv = nn.Linear(c.n_embd, q_dim + 2 * kv_dim, bias=c.bias)  # output [q | k | v]
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, c.n_heads, c.head_dim)) if c.qk_bias else None
        self.proj = nn.Linear(q_dim, c.n_embd, bias=c.bias)

    def forward(self, x: Tensor, ctx: _Ctx, key: Hashable) -> Tensor:
        B, S, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.Wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.kv_heads, self.head_dim)
        v = v.view(B, S, self.kv_heads, self.head_dim)
        if self.qk_bias is not None:
            # Added in the bias's precision, then rounded once: under bf16 autocast this is the reference's
            # `(q + bias).to(q.dtype)`, bit for bit (rounding the bias to bf16 first is not).
            q = (q + self.qk_bias[0]).to(q.dtype)
            k = (k + self.qk_bias[1]).to(k.dtype)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        doc_ids = ctx.doc_ids
        if ctx.cache is not None:
            k, v = ctx.cache.update(key, k, v)
            if doc_ids is not None and ctx.cache.kept is not None:
                doc_ids = doc_ids[:, ctx.cache.kept]
        y = ctx.attn_fn(q, k, v, causal=True, doc_ids=doc_ids)
        return self.proj(y.transpose(1, 2).reshape(B, S, q_dim))


class GatedMLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.n_embd, 2 * c.intermediate_size, bias=c.bias)  # output [a | b]
        self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm, post-norm or sandwich (4 norms) transformer block."""

    _NORMS = {"sandwich": (1, 2, 3, 4), "pre": (1, 3), "post": (2, 4)}

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.kind = c.block_kind
        for i in self._NORMS[c.block_kind]:
            setattr(self, f"norm_{i}", RMSNorm(c.n_embd, c.norm_eps))
        self.attn = Attention(c)
        self.mlp = GatedMLP(c)

    def forward(self, x: Tensor, ctx: _Ctx, key: Hashable) -> Tensor:
        if self.kind == "sandwich":
            x = self.norm_2(self.attn(self.norm_1(x), ctx, key) + x)
            return self.norm_4(self.mlp(self.norm_3(x)) + x)
        if self.kind == "pre":
            x = x + self.attn(self.norm_1(x), ctx, key)
            return x + self.mlp(self.norm_3(x))
        x = self.norm_2(x + self.attn(x, ctx, key))
        return self.norm_4(x + self.mlp(x))


def _no_boundary(state: Tensor) -> None:
    return None


class _LanguageModel(nn.Module):
    """Shared pieces: embedding, final norm, head and loss, initialisation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict()
        self.transformer["wte"] = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.transformer["ln_f"] = RMSNorm(config.n_embd, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self._recurrence_boundary: Callable[[Tensor], None] = _no_boundary

    def set_recurrence_boundary(self, fn: Callable[[Tensor], None] | None) -> None:
        """Call `fn(state)` after the initial state and after every no-grad iteration (None: nothing).

        A lazy-tensor runtime cuts its graph there (XLA: `recpre.xla.cut`), so one compiled graph serves every
        sampled depth n. The model does not know which runtime it is on; the driver sets this once. A GPT has
        no recurrence and never calls it.
        """
        self._recurrence_boundary = _no_boundary if fn is None else fn

    @property
    def head_weight(self) -> Tensor:
        return self.transformer.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def _context(
        self, input_ids: Tensor, doc_ids, position_ids, cache: KVCache | None, key_mask: Tensor | None = None
    ) -> _Ctx:
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids are not supported together with a KV cache")
        if position_ids is None:
            offset = cache.offset if cache is not None else 0
            position_ids = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_base)
        attn_fn = attention.get(self.config.attention)
        if key_mask is not None:
            # Left padding as documents (pad = 0, real = 1); sdpa takes document masks with a short query block.
            doc_ids, attn_fn = key_mask.long(), attention.get("sdpa")
        return _Ctx(cos, sin, attn_fn, doc_ids, cache)

    def _embed(self, input_ids: Tensor) -> Tensor:
        x = self.transformer.wte(input_ids)
        return x * self.config.emb_scale if self.config.emb_scale != 1.0 else x

    def _head(self, x: Tensor, labels: Tensor | None, loss_normalizer) -> tuple[Tensor | None, Tensor | None]:
        weight = self.head_weight
        if labels is None:
            return None, F.linear(x, weight).float()
        hidden, targets = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
        if self.config.fused_head == "chunked":
            from recpre.ops import fused_linear_cross_entropy

            loss = fused_linear_cross_entropy(
                hidden, weight, targets, ignore_index=IGNORE_INDEX, normalizer=loss_normalizer
            )
            return loss, None
        logits = F.linear(hidden, weight).float()
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if loss_normalizer is None:
            loss_normalizer = (targets != IGNORE_INDEX).sum()
        # No targets anywhere: loss 0 (as the fused head gives), not 0/0.
        n = torch.as_tensor(loss_normalizer, dtype=total.dtype, device=total.device)
        return total / torch.where(n > 0, n, torch.ones_like(n)), None

    def _finish(self, x: Tensor, input_ids: Tensor, labels, loss_normalizer, cache, last_position_only: bool):
        """Advance the cache past this chunk, then the head on every position or only the last one."""
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_position_only:
            if labels is not None:
                raise ValueError("last_position_only gives logits for decoding; it takes no labels")
            x = x[:, -1:]
        return self._head(x, labels, loss_normalizer)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from torch's current RNG, in named_parameters order (deterministic).

        Truncated normal (cut at +-3 std) with std = config.init_std; output projections (attn.proj, mlp.proj)
        use std / sqrt(2 * effective_depth); norms are ones; biases and q/k biases are zeros. `scaled-orthogonal`
        (the reference's "scaled" init with init_orthogonal) draws each weight matrix orthogonal instead, with
        the fused q/k/v and gate/up matrices drawn as their separate parts.
        """
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: Tensor) -> None:
        """Initialise the full tensor of parameter `name` in place (a sharding fabric calls this one parameter
        at a time, in named_parameters order, so sharded and unsharded builds draw the same weights)."""
        c, name = self.config, plain_parameter_name(name)
        if "norm" in name.rsplit(".", 2)[-2] or name.endswith("ln_f.weight"):
            nn.init.ones_(p)
        elif name.endswith(".bias") or name.endswith("qk_bias"):
            nn.init.zeros_(p)
        else:
            std = c.out_proj_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else c.init_std
            if c.init_strategy != "scaled-orthogonal":
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-3 * std, b=3 * std)
                return
            parts = [p.shape[0]]
            if name.endswith("attn.Wqkv.weight"):
                parts = [c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
            elif name.endswith("mlp.fc.weight"):
                parts = [c.intermediate_size, c.intermediate_size]
            _init_whole(p, lambda t: _orthogonal_parts_(t, parts, std))

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in forward order: the units a sharding fabric wraps one by one."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def recurrent_blocks(self) -> list[nn.Module]:
        """The blocks that run several times per forward (the looped core); none in a GPT."""
        return []


def _orthogonal_parts_(t: Tensor, parts: list[int], std: float) -> None:
    """Each row block of `t` a truncated orthogonal matrix scaled so its entries have std `std`.

    The reference's truncated orthogonal: a truncated standard normal (cut at +-2), QR, signs fixed by R's
    diagonal, times gain std * sqrt(max(rows, cols)).
    """
    for block in t.split(parts, dim=0):
        rows, cols = block.shape
        flat = torch.empty(rows, cols, dtype=torch.float32, device=block.device)
        nn.init.trunc_normal_(flat, mean=0.0, std=1.0)
        if rows < cols:
            flat = flat.T
        q, r = torch.linalg.qr(flat)
        q = q * torch.diagonal(r).sign()
        if rows < cols:
            q = q.T
        block.copy_(q * (std * math.sqrt(max(rows, cols))))


def _init_whole(p: Tensor, init: Callable[[Tensor], None]) -> None:
    """Run `init` on the whole matrix: a sharded parameter (DTensor) is drawn in full, then re-sharded.

    An orthogonal matrix is a property of the whole matrix; drawing each shard on its own would not give one.
    """
    if not hasattr(p, "full_tensor"):
        init(p)
        return
    from torch.distributed.tensor import distribute_tensor

    full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
    init(full)
    p.copy_(distribute_tensor(full, p.device_mesh, p.placements))


class GPT(_LanguageModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.transformer["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layers))

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        num_steps: int | tuple[int, int] | None = None,
        *,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        loss_normalizer: float | Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        last_position_only: bool = False,
    ) -> ModelOutput:
        """Logits or loss. `key_mask` [batch, past + seq] marks real tokens of left-padded prompts (decoding);
        `last_position_only` computes the head for the last position only (logits [batch, 1, vocab])."""
        ctx = self._context(input_ids, doc_ids, position_ids, cache, key_mask)
        x = self._embed(input_ids)
        for i, block in enumerate(self.transformer.h):
            if self.config.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, ctx, ("h", 0, i), use_reentrant=False)
            else:
                x = block(x, ctx, ("h", 0, i))
        x = self.transformer.ln_f(x)
        loss, logits = self._finish(x, input_ids, labels, loss_normalizer, cache, last_position_only)
        return ModelOutput(loss=loss, logits=logits)


@dataclass
class Iteration:
    """What a per-iteration callback of `RecurrentGPT.iterate` sees, and what it may change.

    The callback runs after every core iteration. It may replace `state` (e.g. keep rows that stopped) and set
    `stop` to end the loop after this iteration. `readout(state)` gives the float32 logits [batch, vocab] of the
    last position through ln_f, coda, ln_f and the head, with this forward's positions and cache.
    """

    step: int  # 0-based index of the iteration just computed
    previous: Tensor  # the state before it (the initial state at step 0)
    state: Tensor  # the state after it
    readout: Callable[[Tensor], Tensor]
    stop: bool = False


StepHook = Callable[[Iteration], None]


class RecurrentGPT(_LanguageModel):
    """prelude -> looped core -> coda. `iterate` is the one implementation of that computation: training
    (`forward`), generation (KV cache, adaptive exit, frozen rows) and the XLA step all run through it."""

    def __init__(self, config: ModelConfig, recurrence_boundary: Callable[[Tensor], None] | None = None) -> None:
        super().__init__(config)
        t = self.transformer
        t["prelude"] = nn.ModuleList(Block(config) for _ in range(config.n_layers_prelude))
        if config.injection == "linear":
            t["adapter"] = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        t["core_block"] = nn.ModuleList(Block(config) for _ in range(config.n_layers_core))
        t["coda"] = nn.ModuleList(Block(config) for _ in range(config.n_layers_coda))
        self.set_recurrence_boundary(recurrence_boundary)

    def recurrent_blocks(self) -> list[nn.Module]:
        return list(self.transformer.core_block)

    def resolve_steps(self, num_steps: int | tuple[int, int] | Tensor | None) -> tuple[int, int]:
        """(n no-grad, k grad) from (n, k), an int r (= (0, r)) or None (the config's mean recurrence)."""
        c = self.config
        if num_steps is None:
            if self.training:
                return max(c.mean_recurrence - c.mean_backprop_depth, 0), min(c.mean_backprop_depth, c.mean_recurrence)
            return 0, c.mean_recurrence
        if isinstance(num_steps, int | np.integer) or (isinstance(num_steps, Tensor) and num_steps.dim() == 0):
            return 0, int(num_steps)
        n, k = (int(v) for v in num_steps)
        if n < 0 or k < 0:
            raise ValueError(f"num_steps must be non-negative, got {(n, k)}")
        return n, k

    def initial_state(self, e: Tensor) -> Tensor:
        """s0: zeros, or (`like-init`) a fresh truncated normal at the init std times the embedding scale."""
        if self.config.state_init == "zero":
            return torch.zeros_like(e)
        std = self.config.init_std
        s = torch.empty_like(e)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return s * self.config.emb_scale

    def core_step(self, s: Tensor, e: Tensor, ctx: _Ctx, step: int) -> Tensor:
        if self.config.injection == "linear":
            s = self.transformer.adapter(torch.cat([s, e], dim=-1))
        else:
            s = s + e
        for i, block in enumerate(self.transformer.core_block):
            s = block(s, ctx, ("core", step, i))
        return s

    def _coda(self, s: Tensor, ctx: _Ctx) -> Tensor:
        x = self.transformer.ln_f(s)
        for i, block in enumerate(self.transformer.coda):
            x = block(x, ctx, ("coda", 0, i))
        return self.transformer.ln_f(x)

    def _readout(self, s: Tensor, ctx: _Ctx) -> Tensor:
        return F.linear(self._coda(s, ctx)[:, -1], self.head_weight).float()

    def iterate(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        num_steps: int | tuple[int, int] | None = None,
        *,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        loss_normalizer: float | Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        last_position_only: bool = False,
        on_step: StepHook | None = None,
    ) -> ModelOutput:
        """The forward pass with its hooks: n no-grad iterations, then k with gradient (see `resolve_steps`).

        `on_step(Iteration)` runs after every iteration (adaptive exit, frozen rows); `key_mask` [batch, past +
        seq] marks the real tokens of left-padded prompts; `last_position_only` computes the head for the last
        position only (logits [batch, 1, vocab], for decoding).
        """
        n, k = self.resolve_steps(num_steps)
        ctx = self._context(input_ids, doc_ids, position_ids, cache, key_mask)
        e = self._embed(input_ids)
        for i, block in enumerate(self.transformer.prelude):
            e = block(e, ctx, ("prelude", 0, i))
        s = self.initial_state(e)
        self._recurrence_boundary(s)
        checkpointed = self.config.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for step in range(n + k):
            previous = s
            if step < n:
                with torch.no_grad():
                    s = self.core_step(s, e, ctx, step)
                self._recurrence_boundary(s)
            elif checkpointed:
                s = checkpoint(self.core_step, s, e, ctx, step, use_reentrant=False)
            else:
                s = self.core_step(s, e, ctx, step)
            if on_step is not None:
                it = Iteration(step, previous, s, lambda state: self._readout(state, ctx))
                on_step(it)
                s = it.state
                if it.stop:
                    break
        x = self._coda(s, ctx)
        loss, logits = self._finish(x, input_ids, labels, loss_normalizer, cache, last_position_only)
        return ModelOutput(loss=loss, logits=logits, state=s)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        num_steps: int | tuple[int, int] | None = None,
        **kwargs,
    ) -> ModelOutput:
        """Logits (labels None) or loss; keywords as for `iterate`."""
        return self.iterate(input_ids, labels, num_steps, **kwargs)


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> GPT | RecurrentGPT:
    """The model for `config`; weights drawn from torch's current RNG, or left unallocated on "meta"."""
    cls = RecurrentGPT if config.is_recurrent else GPT
    with torch.device("meta"):
        model = cls(config)
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    model.init_weights()
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile every transformer block in place.

    Compiling the whole forward unrolls the recurrence, so each newly sampled depth is a recompile; per block,
    one graph serves every depth. Parameter names (and so checkpoints) stay as they are.
    """
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**compile_kwargs)
    return model
