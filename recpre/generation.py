"""Text generation: KV-cached incremental decoding, sampling, stop conditions and adaptive recurrence depth.

The forward pass is composed here from the model's own pieces (embedding, blocks, `core_step`, head) rather than
through `model.forward`, because decoding needs three things the training forward does not have: a padding mask
for batched prompts of different lengths (left padding, expressed as document ids so real tokens never attend to
padding), the head on the last position only, and a recurrence loop that can stop early per row.

Caches: GPT and fixed-depth recurrent decoding work with the model's strict `KVCache` semantics (one entry per block
and recurrence step). `RecurrentKVCache` adds what adaptive depth and bounded memory need: a token that stopped
iterating early lends its last computed core entry to the steps it skipped, and `share_every=m` keeps only m core
slots per block (step j reads and writes slot j % m), so memory no longer grows with the recurrence depth.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from recpre import attention
from recpre.errors import UserError
from recpre.model import KVCache

STOP_CRITERIA = ("state", "kl")


class RecurrentKVCache(KVCache):
    """KV cache for recurrent decoding with adaptive depth and optional slot sharing across recurrence steps.

    Rules, applied per forward: an entry written twice for the same tokens keeps the last write (shared slots,
    probe passes); at `advance` every core slot not written for the new tokens receives the entry of the last step
    those tokens did compute (the "latest" rule); rows marked frozen (they stopped iterating) keep writing their
    frozen entries, so results do not depend on which other rows share the batch.
    """

    def __init__(self, share_every: int | None = None) -> None:
        super().__init__()
        if share_every is not None and share_every < 1:
            raise ValueError(f"share_every must be a positive integer, got {share_every}")
        self.share_every = share_every
        self._current: dict[int, tuple[Tensor, Tensor]] = {}  # core block -> new tokens' latest entry
        self._frozen: Tensor | None = None  # [batch] bool
        self._frozen_kv: dict[int, tuple[Tensor, Tensor]] = {}

    def slot(self, key: Hashable) -> Hashable:
        if self.share_every and isinstance(key, tuple) and key[0] == "core":
            return ("core", key[1] % self.share_every, key[2])
        return key

    def core_slots(self) -> int:
        """Distinct core steps held per block (bounded by share_every)."""
        return len({k[1] for k in self.keys if isinstance(k, tuple) and k[0] == "core"})

    def past(self, key: Hashable) -> tuple[Tensor, Tensor] | None:
        key = self.slot(key)
        if not self.offset:
            return None
        if key not in self.keys:
            if not (isinstance(key, tuple) and key[0] == "core"):
                raise ValueError(f"KV cache has no entry for {key} but holds {self.offset} tokens")
            # A step deeper than any earlier token ran: their latest step stands in for it.
            lower = [k for k in self.keys if k[0] == "core" and k[2] == key[2] and k[1] < key[1]]
            if not lower:
                raise ValueError(f"KV cache has no core entry for block {key[2]} below step {key[1]}")
            src = max(lower, key=lambda k: k[1])
            self.keys[key], self.values[key] = self.keys[src], self.values[src]
        k, v = self.keys[key], self.values[key]
        return k[..., : self.offset, :], v[..., : self.offset, :]

    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        is_core = isinstance(key, tuple) and key[0] == "core"
        if is_core and self._frozen is not None and key[2] in self._frozen_kv:
            fk, fv = self._frozen_kv[key[2]]
            keep = self._frozen[:, None, None, None]
            k, v = torch.where(keep, fk, k), torch.where(keep, fv, v)
        if is_core:
            self._current[key[2]] = (k, v)
        past = self.past(key)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        slot = self.slot(key)
        self.keys[slot], self.values[slot] = k, v
        return k, v

    def freeze(self, rows: Tensor) -> None:
        """Rows (bool [batch]) that stop iterating now: later core steps reuse their latest entries."""
        self._frozen = rows.clone()
        self._frozen_kv = dict(self._current)

    def advance(self, n: int) -> None:
        end = self.offset + n
        for key in [k for k in self.keys if isinstance(k, tuple) and k[0] == "core"]:
            if self.keys[key].shape[-2] < end and key[2] in self._current:
                ck, cv = self._current[key[2]]
                self.keys[key] = torch.cat([self.keys[key][..., : self.offset, :], ck], dim=-2)
                self.values[key] = torch.cat([self.values[key][..., : self.offset, :], cv], dim=-2)
        self._current.clear()
        self._frozen, self._frozen_kv = None, {}
        self.offset = end

    def reset(self) -> None:
        super().reset()
        self._current.clear()
        self._frozen, self._frozen_kv = None, {}


@dataclass
class AdaptiveDepth:
    """Stop iterating the core for a token once successive iterations agree.

    criterion "state": relative distance ||s_j - s_{j-1}|| / ||s_j|| of the last position's state;
    "kl": KL(p_{j-1} || p_j) of the output distributions (runs the coda and head at every step).
    """

    threshold: float = 1e-3
    criterion: str = "kl"
    min_steps: int = 1

    def __post_init__(self) -> None:
        if self.criterion not in STOP_CRITERIA:
            raise UserError(f"adaptive depth criterion '{self.criterion}' is unknown; choose one of {STOP_CRITERIA}")
        if self.threshold < 0 or self.min_steps < 1:
            raise UserError("adaptive depth needs threshold >= 0 and min_steps >= 1")


@dataclass
class GenerationOutput:
    sequences: Tensor  # [batch, prompt + new] (left padding kept; pad after a row finished)
    new_tokens: list[list[int]]  # per row, up to and including the eos / the token completing a stop string
    depths: list[list[int]] = field(default_factory=list)  # per row, recurrence steps used per new token
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def mean_depth(self) -> float:
        flat = [d for row in self.depths for d in row]
        return sum(flat) / len(flat) if flat else 0.0


# ---- sampling -------------------------------------------------------------------------------------------------


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Logits [..., V] with everything outside the top-k / nucleus (top-p) set to -inf (at least one kept)."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else sampled from the filtered softmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the decoding forward -------------------------------------------------------------------------------------


def _context(model, input_ids: Tensor, positions: Tensor, key_mask: Tensor | None, cache: KVCache | None):
    ctx = model._context(input_ids, None, positions, cache)
    if key_mask is not None:
        # Left padding as documents: pad = 0, real = 1; sdpa takes document masks with a short query block.
        ctx.doc_ids = key_mask.long()
        ctx.attn_fn = attention.get("sdpa")
    return ctx


def _coda_logits(model, s: Tensor, ctx) -> Tensor:
    t = model.transformer
    x = t.ln_f(s)
    for i, block in enumerate(t.coda):
        x = block(x, ctx, ("coda", 0, i))
    x = t.ln_f(x)
    return F.linear(x[:, -1], model.head_weight).float()


def _vocab_mask(model, logits: Tensor) -> Tensor:
    """Padded embedding rows are not tokens: never predict them."""
    v = model.config.vocab_size
    if logits.shape[-1] > v:
        logits = logits.clone()
        logits[..., v:] = float("-inf")
    return logits


@torch.no_grad()
def forward_last(
    model,
    input_ids: Tensor,
    *,
    positions: Tensor,
    key_mask: Tensor | None = None,
    cache: KVCache | None = None,
    num_steps: int | None = None,
    adaptive: AdaptiveDepth | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits of the last position [B, V] and the recurrence steps used per row [B] (0 for GPT).

    `key_mask` [B, past + S] marks real tokens (False = left padding), `positions` [B, S] their RoPE positions.
    """
    B = input_ids.shape[0]
    ctx = _context(model, input_ids, positions, key_mask, cache)
    t = model.transformer
    x = model._embed(input_ids)
    if not model.config.is_recurrent:
        for i, block in enumerate(t.h):
            x = block(x, ctx, ("h", 0, i))
        x = t.ln_f(x)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        logits = F.linear(x[:, -1], model.head_weight).float()
        return logits, torch.zeros(B, dtype=torch.long)
    steps = model.config.mean_recurrence if num_steps is None else int(num_steps)
    for i, block in enumerate(t.prelude):
        x = block(x, ctx, ("prelude", 0, i))
    e = x
    s = model.initial_state(e)
    depth = torch.full((B,), steps, dtype=torch.long)
    if adaptive is None:
        for step in range(steps):
            s = model.core_step(s, e, ctx, step)
    else:
        if not isinstance(cache, RecurrentKVCache):
            raise ValueError("adaptive depth needs a RecurrentKVCache")
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        prev_logp = None
        for step in range(steps):
            s_new = model.core_step(s, e, ctx, step)
            s_new = torch.where(done[:, None, None], s, s_new)
            if adaptive.criterion == "state":
                a, b = s_new[:, -1].float(), s[:, -1].float()
                metric = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)
                if step == 0:
                    metric = torch.full_like(metric, float("inf"))
            else:
                logp = _vocab_mask(model, _coda_logits(model, s_new, ctx)).log_softmax(-1)
                if prev_logp is None:
                    metric = torch.full((B,), float("inf"), device=logp.device)
                else:
                    p = prev_logp.exp()
                    metric = torch.where(p > 0, p * (prev_logp - logp), torch.zeros_like(p)).sum(-1)
                prev_logp = logp
            s = s_new
            if step + 1 < adaptive.min_steps or step + 1 == steps:
                continue
            newly = (metric < adaptive.threshold) & ~done
            if newly.any():
                depth[newly.cpu()] = step + 1
                done = done | newly
                if done.all():
                    break
                cache.freeze(done)
    logits = _coda_logits(model, s, ctx)
    if cache is not None:
        cache.advance(input_ids.shape[1])
    return logits, depth


# ---- generate -------------------------------------------------------------------------------------------------


def _as_batch(input_ids, attention_mask, pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids [B, S] left padded, mask [B, S] bool) from a tensor (+ optional mask) or a list of token lists."""
    if isinstance(input_ids, Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        if (mask[:, 1:].long() < mask[:, :-1].long()).any():
            raise ValueError("attention_mask must be left padding (zeros before the prompt only)")
        return ids.long(), mask
    rows = [list(map(int, r)) for r in input_ids]
    if not rows:
        raise ValueError("generate needs at least one prompt")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
    return ids, mask


@torch.no_grad()
def generate_with_info(
    model,
    input_ids: Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    stop: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    adaptive: AdaptiveDepth | None = None,
    share_every: int | None = None,
) -> GenerationOutput:
    """Generate for a batch of prompts; see `generate`. Also returns per-row new tokens and depths used."""
    config = model.config
    eos_id = config.eos_id if eos_id is None else eos_id
    if pad_id is None:
        pad_id = config.pad_id if config.pad_id is not None else (eos_id if eos_id is not None and eos_id >= 0 else 0)
    if stop and decode is None:
        raise ValueError("stop strings need a `decode` function (token ids -> text)")
    if adaptive is not None and not config.is_recurrent:
        raise UserError("adaptive depth only applies to recurrent models; drop it for a GPT checkpoint")
    if adaptive is not None and not use_cache:
        raise UserError("adaptive depth needs the KV cache; set use_cache=True")
    if share_every is not None and not use_cache:
        raise UserError("a shared cache (share_every) needs use_cache=True")
    ids, mask = _as_batch(input_ids, attention_mask, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    if (mask.sum(-1) == 0).any():
        raise ValueError("every prompt needs at least one token (use the BOS/EOS token for an empty prompt)")
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.initial_seed() if seed is None else seed))
    padded = not bool(mask.all())
    if use_cache:
        cache: KVCache = RecurrentKVCache(share_every) if config.is_recurrent else KVCache()
    else:
        cache = None
    done = torch.zeros(B, dtype=torch.bool)
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    depths: list[list[int]] = [[] for _ in range(B)]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    prompt_lengths = [int(n) for n in mask.sum(-1)]
    was_training = model.training
    model.eval()
    try:
        step_ids, step_pos = ids, positions
        for _ in range(max_new_tokens):
            if use_cache:
                logits, used = forward_last(
                    model,
                    step_ids,
                    positions=step_pos,
                    key_mask=mask if padded else None,
                    cache=cache,
                    num_steps=num_steps,
                    adaptive=adaptive if cache.offset else None,  # the prompt runs at full depth
                )
            elif padded:
                logits, used = forward_last(model, ids, positions=positions, key_mask=mask, num_steps=num_steps)
            else:
                out = model(ids, num_steps=num_steps)
                logits = out.logits[:, -1]
                used = torch.full((B,), model.resolve_steps(num_steps)[1] if config.is_recurrent else 0)
            nxt = sample_next(
                _vocab_mask(model, logits), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            nxt = torch.where(done.to(device), torch.full_like(nxt, pad_id), nxt)
            for b in range(B):
                if done[b]:
                    continue
                token = int(nxt[b])
                new_tokens[b].append(token)
                depths[b].append(int(used[b]))
                if (eos_id is not None and token == eos_id) or (stop and any(s in decode(new_tokens[b]) for s in stop)):
                    done[b] = True
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.bool, device=device)], dim=1)
            step_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, step_pos], dim=1)
            step_ids = nxt[:, None]
            if done.all():
                break
    finally:
        model.train(was_training)
    return GenerationOutput(ids, new_tokens, depths, prompt_lengths)


def generate(
    model,
    input_ids: Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    **kwargs,
) -> Tensor:
    """Prompt + new tokens [B, S + n] (LongTensor) for GPT or RecurrentGPT.

    `input_ids`: a LongTensor [B, S] (with an optional left-padding `attention_mask`) or a list of token lists of
    different lengths (left padded with `pad_id` in the result). Greedy at temperature 0; otherwise sampled after
    top-k / top-p filtering with a generator seeded by `seed`. A row ends at `eos_id` (default: the model config's)
    or once its decoded new text contains one of `stop` (needs `decode`); finished rows are filled with `pad_id`.
    Recurrent models run `num_steps` core iterations (default: the mean recurrence); `adaptive=AdaptiveDepth(...)`
    stops earlier per token, `share_every=m` bounds the cache to m core slots per block.
    """
    return generate_with_info(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        num_steps=num_steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_cache=use_cache,
        seed=seed,
        **kwargs,
    ).sequences
