"""Fused linear cross-entropy: the LM head and its loss without materialising [tokens x vocab] logits.

The naive head keeps logits, their log-softmax and their gradient alive at once (several x N x V floats);
this op walks the tokens in chunks, so the extra memory is O(chunk x V) plus one fp32 copy of dW.

Semantics (all reductions count only targets != ignore_index):
  token loss  l_i = lse_i - (1 - eps) z_i[y_i] - eps * mean_j z_ij + z_loss * lse_i^2
              (eps = label_smoothing, same convention as F.cross_entropy over the V rows of `weight`)
  "mean"      sum_i l_i / M, M = `normalizer` if given (float or 0-dim tensor, e.g. the token count over
              micro-batches and ranks; treated as a constant) else the number of non-ignored targets;
              M = 0 gives 0, not NaN.
  "sum"       sum_i l_i (no normalizer allowed).
  "none"      per-token l_i shaped like `targets`, 0 at ignored positions.

Two ways to get the gradient, both exact:
  * "mean"/"sum": the gradient is computed chunk by chunk *inside forward* (3 matmuls, like the naive path)
    and only scaled by grad_output in backward; forward is only this expensive when a gradient is needed.
  * "none": forward saves only the per-token log-sum-exp; backward recomputes each chunk's logits (4 matmuls)
    because a per-token grad_output cannot be applied to an already-summed dW.
Per-chunk maths runs in at least fp32 (fp64 inputs stay fp64) and dW accumulates in fp32 whatever the
weight dtype. Everything is plain tensor algebra with no host synchronisation, so CPU, CUDA and XLA work.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# Chunks are sized by the bytes of one fp32 [chunk x V] logits block. On CPU, 256/512/1024 rows at V=32768
# (32/64/128 MiB) cost 0.91x/0.89x/0.88x the naive path's CPU time while the extra peak doubles with each
# step (benchmarks/results/2026-11-23_cpu_loss.md): 64 MiB balances the two. GPUs prefer larger matmuls.
CHUNK_BYTES = {"cpu": 64 * 2**20}
DEFAULT_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK, MAX_CHUNK = 64, 16384

IGNORE_INDEX = -100  # targets with this value are not scored (prompt tokens, padding, masked positions)


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that one fp32 logits block is about CHUNK_BYTES for the device type."""
    dev = torch.device(device).type
    budget = CHUNK_BYTES.get(dev, DEFAULT_CHUNK_BYTES)
    rows = max(MIN_CHUNK, min(MAX_CHUNK, budget // (4 * max(vocab_size, 1))))
    return max(1, min(rows, num_tokens))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _mm_f32(a: Tensor, b: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """a @ b with an fp32 (or wider) result; low-precision inputs keep their fast matmul."""
    if a.dtype == acc_dtype:
        return torch.mm(a, b)
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=acc_dtype)
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a, b).to(acc_dtype)


def _acc_mm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, accumulating in acc's (fp32 or wider) dtype; no temporary when dtypes already agree."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(_mm_f32(a, b, acc.dtype))


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _no_autocast(device_type: str):
    """The op casts explicitly; autocast must not re-cast its matmuls or fight its out= buffers."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on (as F.linear would), else the inputs'."""
    dev = hidden.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError, AttributeError):
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, weight: Tensor, cdt: torch.dtype) -> Tensor:
    return _mm_f32(h, weight.t(), cdt)


def _token_loss(
    logits: Tensor, tgt: Tensor, mask: Tensor, z_loss: float, label_smoothing: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token loss, lse and row max; leaves exp(logits - max) in `logits` (in place, no extra block)."""
    z_y = logits.gather(1, tgt.unsqueeze(1)).squeeze(1)
    mean_z = logits.mean(dim=1) if label_smoothing else None
    row_max = logits.amax(dim=1)
    logits.sub_(row_max.unsqueeze(1)).exp_()
    sum_exp = logits.sum(dim=1)
    lse = row_max + sum_exp.log()
    loss = lse - (1.0 - label_smoothing) * z_y
    if mean_z is not None:
        loss = loss - label_smoothing * mean_z
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, lse, sum_exp


def _dlogits_(probs: Tensor, tgt: Tensor, coef: Tensor, lse: Tensor, z_loss: float, label_smoothing: float) -> Tensor:
    """Turn softmax probabilities (in place) into dL/dlogits for rows weighted by coef (0 for ignored)."""
    row = coef * (1.0 + 2.0 * z_loss * lse) if z_loss else coef
    probs.mul_(row.unsqueeze(1))
    probs.scatter_add_(1, tgt.unsqueeze(1), (-(1.0 - label_smoothing) * coef).unsqueeze(1))
    if label_smoothing:
        probs.sub_((label_smoothing / probs.shape[1]) * coef.unsqueeze(1))
    return probs


def _as_tensor(x: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(x), device=like.device, dtype=like.dtype)


class _FusedLCE(torch.autograd.Function):
    """Scalar reductions: gradient computed in forward, scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_norm, ignore_index, z_loss, label_smoothing, chunk, mm_dtype):
        with _no_autocast(hidden.device.type):
            return _FusedLCE._forward(
                ctx, hidden, weight, targets, inv_norm, ignore_index, z_loss, label_smoothing, chunk, mm_dtype
            )

    @staticmethod
    def _forward(ctx, hidden, weight, targets, inv_norm, ignore_index, z_loss, label_smoothing, chunk, mm_dtype):
        cdt = _compute_dtype(mm_dtype)
        n = hidden.shape[0]
        w = weight.to(mm_dtype)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), device=hidden.device, dtype=cdt)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=cdt) if need_dw else None
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(mm_dtype)
            t = targets[s : s + chunk]
            mask = t != ignore_index
            tgt = torch.where(mask, t, torch.zeros_like(t))
            logits = _chunk_logits(h, w, cdt)
            loss, lse, sum_exp = _token_loss(logits, tgt, mask, z_loss, label_smoothing)
            total = total + loss.sum()
            if need_dh or need_dw:
                probs = logits.div_(sum_exp.unsqueeze(1))
                coef = mask.to(cdt) * inv_norm
                g = _dlogits_(probs, tgt, coef, lse, z_loss, label_smoothing).to(mm_dtype)
                if need_dh:
                    _mm_into(dh[s : s + chunk], g, w)
                if need_dw:
                    _acc_mm_(dw, g.t(), h)
            del logits
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total * inv_norm

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        hdt, wdt = ctx.dtypes
        gh = gw = None
        if dh is not None:
            gh = (dh * grad_out).to(hdt)
        if dw is not None:
            gw = (dw * grad_out.to(dw.dtype)).to(wdt)
        return gh, gw, None, None, None, None, None, None, None


class _FusedLCENone(torch.autograd.Function):
    """reduction="none": saves only lse; backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, label_smoothing, chunk, mm_dtype):
        out, lse_all = _per_token(hidden, weight, targets, ignore_index, z_loss, label_smoothing, chunk, mm_dtype)
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.args = (ignore_index, z_loss, label_smoothing, chunk, mm_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse_all = ctx.saved_tensors
        ignore_index, z_loss, label_smoothing, chunk, mm_dtype = ctx.args
        with _no_autocast(hidden.device.type):
            return _FusedLCENone._backward(ctx, grad_out, hidden, weight, targets, lse_all, mm_dtype)

    @staticmethod
    def _backward(ctx, grad_out, hidden, weight, targets, lse_all, mm_dtype):
        ignore_index, z_loss, label_smoothing, chunk, _ = ctx.args
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = lse_all.dtype
        w = weight.to(mm_dtype)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=cdt) if need_dw else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(mm_dtype)
            t = targets[s : s + chunk]
            lse = lse_all[s : s + chunk]
            mask = t != ignore_index
            tgt = torch.where(mask, t, torch.zeros_like(t))
            probs = _chunk_logits(h, w, cdt).sub_(lse.unsqueeze(1)).exp_()
            coef = mask.to(cdt) * grad_out[s : s + chunk].to(cdt)
            g = _dlogits_(probs, tgt, coef, lse, z_loss, label_smoothing).to(mm_dtype)
            if need_dh:
                _mm_into(dh[s : s + chunk], g, w)
            if need_dw:
                _acc_mm_(dw, g.t(), h)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None, None, None


def _per_token(hidden, weight, targets, ignore_index, z_loss, label_smoothing, chunk, mm_dtype):
    """Per-token losses and lse, no gradient bookkeeping (also the eval / torch.no_grad path)."""
    cdt = _compute_dtype(mm_dtype)
    n = hidden.shape[0]
    out = torch.empty(n, device=hidden.device, dtype=cdt)
    lse_all = torch.empty(n, device=hidden.device, dtype=cdt)
    with torch.no_grad(), _no_autocast(hidden.device.type):
        w = weight.to(mm_dtype)
        for s in range(0, n, chunk):
            t = targets[s : s + chunk]
            mask = t != ignore_index
            tgt = torch.where(mask, t, torch.zeros_like(t))
            logits = _chunk_logits(hidden[s : s + chunk].to(mm_dtype), w, cdt)
            loss, lse, _ = _token_loss(logits, tgt, mask, z_loss, label_smoothing)
            out[s : s + chunk] = loss
            lse_all[s : s + chunk] = lse
            del logits
    return out, lse_all


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without materialising the logits.

    hidden [..., d], weight [V, d], targets [...] (int64). Returns a 0-dim tensor for "mean"/"sum", per-token
    losses shaped like `targets` for "none" (semantics in the module docstring), in fp32 for bf16/fp16/fp32
    inputs (fp64 for fp64); gradients come back in each input's dtype. chunk_size None picks
    `default_chunk_size`. `naive_linear_cross_entropy` is the reference with the same semantics.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if normalizer is not None and reduction != "mean":
        raise ValueError("normalizer only applies to reduction='mean'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., d] and weight [V, d] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    out_shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    n = h2.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n, weight.shape[0], hidden.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if n == 0:
        zero = (h2.sum() * 0.0).float() + (weight.sum() * 0.0).float()
        return zero.new_zeros(out_shape) + zero if reduction == "none" else zero
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    mm_dtype = _matmul_dtype(hidden, weight)
    args = (ignore_index, z_loss, label_smoothing, chunk, mm_dtype)
    if reduction == "none":
        if grad:
            return _FusedLCENone.apply(h2, weight, t1, *args).view(out_shape)
        return _per_token(h2, weight, t1, *args)[0].view(out_shape)
    cdt = _compute_dtype(mm_dtype)
    if reduction == "sum":
        inv = torch.ones((), device=hidden.device, dtype=cdt)
    elif normalizer is None:
        inv = 1.0 / (t1 != ignore_index).sum().to(cdt).clamp_min(1.0)
    else:
        norm = _as_tensor(normalizer, torch.empty(0, device=hidden.device, dtype=cdt))
        # a zero normalizer means no targets anywhere: loss and gradients 0, not NaN (no host sync to check)
        inv = torch.where(norm == 0, torch.zeros_like(norm), 1.0 / norm)
    if grad:
        return _FusedLCE.apply(h2, weight, t1, inv, *args)
    return _per_token(h2, weight, t1, *args)[0].sum() * inv


def naive_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reference with the same semantics: full logits, F.cross_entropy (what `fused_head: none` costs)."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    logits = (h2 @ weight.t()).float() if h2.dtype in (torch.float16, torch.bfloat16) else h2 @ weight.t()
    per = torch.nn.functional.cross_entropy(
        logits, t1, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        per = per + torch.where(t1 != ignore_index, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return per.view(targets.shape)
    total = per.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        return total / (t1 != ignore_index).sum().clamp_min(1)
    return total / normalizer


__all__ = ["IGNORE_INDEX", "fused_linear_cross_entropy", "naive_linear_cross_entropy", "default_chunk_size"]
