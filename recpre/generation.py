"""Text generation: KV-cached incremental decoding, sampling, stop conditions and adaptive recurrence depth.

Decoding runs the model's own forward (`RecurrentGPT.iterate` / `GPT.forward`) with three options training does
not use: a padding mask for batched prompts of different lengths (left padding), the head on the last position
only, and, for adaptive depth, a per-iteration callback that measures convergence, freezes rows that stopped
and ends the loop once every row has.

Caches: GPT decoding uses the model's strict `KVCache`; recurrent decoding uses `RecurrentKVCache`
(recpre/recurrent_cache.py), whose lookup strategy says which entries stand in for recurrence steps an earlier
token skipped, and whose `share_every=m` bounds memory to m iterations' slots per block.

Adaptive exit follows the Huginn reference implementation (`generate_with_adaptive_compute` and the
`*ExitEvaluator` classes of github.com/seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py): the
same criteria, thresholds, initial comparison values and check schedule. recpre's defaults differ in three
safer choices, each reversible (`AdaptiveDepth.like_reference()` sets all three back): the prompt runs at full
depth (the reference may exit during prefill, on a criterion averaged over the whole prompt), rows that stopped
are frozen (the reference keeps iterating them, so a row's cache depends on its batch neighbours), and the
cache lookup is `latest-m4` (the reference's default `full` drops skipped tokens from attention). See
docs/huginn.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from recpre.errors import UserError
from recpre.model import Iteration, KVCache
from recpre.recurrent_cache import RecurrentKVCache, parse_lookup

__all__ = [
    "EXIT_CRITERIA",
    "AdaptiveDepth",
    "GenerationOutput",
    "RecurrentKVCache",
    "filter_logits",
    "forward_last",
    "generate",
    "generate_with_info",
    "sample_next",
]

# criterion -> the reference's default threshold ("auto"). A row exits when the value drops below the threshold
# (argmax-stability: when the argmax has been the same for at least `threshold` consecutive checks).
EXIT_CRITERIA: dict[str, float] = {
    "kl": 1e-3,  # KL(p_prev || p) of the last position's next-token distributions (p_prev starts uniform)
    "minp-kl": 1e-5,  # the same KL after a min-p filter (p < 0.1 max p set to 1/V, renormalised)
    "entropy-diff": 1e-3,  # |H(p) - H(p_prev)| (H_prev starts at 100)
    "latent-diff": 0.03,  # ||s - s_prev|| / ||s||, averaged over the chunk's positions (s_prev starts at s0)
    "cosine": 1e-3,  # 1 - cos(s, s_prev), averaged over positions
    "argmax-stability": 5,  # consecutive checks with an unchanged argmax
    "none": 0.0,  # never exit early
}


@dataclass
class AdaptiveDepth:
    """Stop iterating the core for a token once successive iterations agree (per row).

    `threshold` None takes the criterion's default (EXIT_CRITERIA). An exit is considered after at least
    `min_steps` iterations and then every `check_every` iterations (the reference's min_steps is this minus one).
    recpre's defaults: no exit during the prompt, stopped rows frozen, `latest-m4` cache lookup.
    """

    threshold: float | None = None
    criterion: str = "kl"
    min_steps: int = 1
    check_every: int = 1
    exit_in_prefill: bool = False
    freeze_exited: bool = True
    cache_lookup: str = "latest-m4"

    def __post_init__(self) -> None:
        if self.criterion not in EXIT_CRITERIA:
            raise UserError(
                f"adaptive depth criterion '{self.criterion}' is unknown; choose one of {', '.join(EXIT_CRITERIA)}"
            )
        if self.threshold is None:
            self.threshold = EXIT_CRITERIA[self.criterion]
        if self.threshold < 0 or self.min_steps < 1 or self.check_every < 1:
            raise UserError("adaptive depth needs threshold >= 0, min_steps >= 1 and check_every >= 1")
        parse_lookup(self.cache_lookup)

    @classmethod
    def like_reference(cls, criterion: str = "kl", threshold: float | None = None, **kwargs) -> AdaptiveDepth:
        """The reference implementation's defaults: exit during prefill, stopped rows keep iterating, `full`."""
        values = {"exit_in_prefill": True, "freeze_exited": False, "cache_lookup": "full", **kwargs}
        return cls(threshold, criterion, **values)


class _ExitMonitor:
    """The per-iteration callback of one forward: the reference's exit evaluator, per row."""

    def __init__(self, rule: AdaptiveDepth, vocab: int, steps: int, inactive: Tensor, real: Tensor | None, cache):
        self.rule, self.vocab, self.cache = rule, vocab, cache
        self.real = real  # [B, S] bool: positions that count in position averages (None = all)
        self.done = inactive.clone()  # rows that need no more iterations (exited, or finished generating)
        self.depth = torch.full(inactive.shape, steps, dtype=torch.long)
        self.exit_logits: Tensor | None = None  # stopped rows' logits when they are not frozen
        self.exited = torch.zeros_like(inactive)
        self.memory: dict[str, Tensor] = {}

    def __call__(self, it: Iteration) -> None:
        rule = self.rule
        if it.step == 0:
            self._start(it.previous)
        if rule.freeze_exited:
            it.state = torch.where(self.done[:, None, None], it.previous, it.state)
        j = it.step + 1 - rule.min_steps  # checks at iterations min_steps, min_steps + check_every, ...
        if j < 0 or j % rule.check_every or rule.criterion == "none":
            return
        logits = it.readout(it.state) if _needs_logits(rule.criterion) else None
        newly = self._check(it.state, logits) & ~self.done
        if not bool(newly.any()):
            return
        self.depth[newly.cpu()] = it.step + 1
        self.exited |= newly
        if not rule.freeze_exited:
            logits = it.readout(it.state) if logits is None else logits
            self.exit_logits = logits.clone() if self.exit_logits is None else self.exit_logits
            self.exit_logits[newly] = logits[newly]
        self.done |= newly
        if bool(self.done.all()):
            it.stop = True
        elif rule.freeze_exited:
            self.cache.freeze(self.done)

    def _start(self, s0: Tensor) -> None:
        """The reference evaluators' initial comparison values."""
        B = s0.shape[0]
        self.memory = {
            "log_probs": torch.full((B, self.vocab), 1 / self.vocab, device=s0.device).log(),
            "entropy": torch.full((B,), 100.0, device=s0.device),
            "argmax": torch.full((B,), -1, dtype=torch.long, device=s0.device),
            "stable": torch.zeros(B, dtype=torch.long, device=s0.device),
            "state": s0,
        }

    def _mean_over_positions(self, values: Tensor) -> Tensor:
        if self.real is None:
            return values.mean(dim=-1)
        mask = self.real.to(values.dtype)
        return (values * mask).sum(-1) / mask.sum(-1)

    def _check(self, state: Tensor, logits: Tensor | None) -> Tensor:
        c, m, threshold = self.rule.criterion, self.memory, self.rule.threshold
        if c in ("latent-diff", "cosine"):
            prev, m["state"] = m["state"], state
            if c == "latent-diff":
                return self._mean_over_positions((state - prev).norm(dim=-1) / state.norm(dim=-1)) < threshold
            cosine = (state * prev).sum(dim=-1) / state.norm(dim=-1) / prev.norm(dim=-1)
            return 1 - self._mean_over_positions(cosine) < threshold
        logits = logits[:, : self.vocab].float()
        if c == "argmax-stability":
            current = logits.argmax(dim=-1)
            m["stable"] = torch.where(current == m["argmax"], m["stable"] + 1, torch.zeros_like(m["stable"]))
            m["argmax"] = current
            return m["stable"] >= threshold
        if c == "entropy-diff":
            probs = logits.softmax(dim=-1)
            entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1)
            values, m["entropy"] = (entropy - m["entropy"]).abs(), entropy
            return values < threshold
        log_probs = logits.log_softmax(dim=-1) if c == "kl" else _minp_log_probs(logits, self.vocab)
        values = F.kl_div(log_probs, m["log_probs"], reduction="none", log_target=True).sum(dim=-1)
        m["log_probs"] = log_probs
        return values < threshold


def _needs_logits(criterion: str) -> bool:
    return criterion in ("kl", "minp-kl", "entropy-diff", "argmax-stability")


def _minp_log_probs(logits: Tensor, vocab: int) -> Tensor:
    probs = logits.softmax(dim=-1)
    probs = torch.where(probs < 0.1 * probs.max(dim=-1, keepdim=True).values, 1 / vocab, probs)
    return (probs / probs.sum(dim=-1, keepdim=True)).log()


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
    finished: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits of the last position [B, V] and the recurrence steps used per row [B] (0 for GPT).

    `key_mask` [B, past + S] marks real tokens (False = left padding), `positions` [B, S] their RoPE positions;
    `finished` [B] marks rows whose output is no longer used (adaptive depth does not wait for them).
    """
    B = input_ids.shape[0]
    kwargs = dict(position_ids=positions, key_mask=key_mask, cache=cache, last_position_only=True)
    if not model.config.is_recurrent:
        return model(input_ids, **kwargs).logits[:, -1], torch.zeros(B, dtype=torch.long)
    steps = model.config.mean_recurrence if num_steps is None else int(num_steps)
    if adaptive is None:
        return model(input_ids, num_steps=steps, **kwargs).logits[:, -1], torch.full((B,), steps, dtype=torch.long)
    if not isinstance(cache, RecurrentKVCache):
        raise ValueError("adaptive depth needs a RecurrentKVCache")
    inactive = torch.zeros(B, dtype=torch.bool, device=input_ids.device) if finished is None else finished.clone()
    real = None if key_mask is None else key_mask[:, -input_ids.shape[1] :]
    monitor = _ExitMonitor(adaptive, model.config.vocab_size, steps, inactive.to(input_ids.device), real, cache)
    logits = model(input_ids, num_steps=steps, on_step=monitor, **kwargs).logits[:, -1]
    if monitor.exit_logits is not None:
        logits = torch.where(monitor.exited[:, None], monitor.exit_logits, logits)
    return logits, monitor.depth


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
    if not use_cache:
        cache = None
    elif config.is_recurrent:
        lookup = adaptive.cache_lookup if adaptive is not None else "latest-m4"
        cache = RecurrentKVCache.for_config(config, lookup, share_every)
    else:
        cache = KVCache()
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
                    adaptive=adaptive if cache.offset or (adaptive and adaptive.exit_in_prefill) else None,
                    finished=done.to(device),
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
