"""A pure-torch stand-in for the NKI flash-attention kernels: same signatures, layouts, grid and lse format.

It lets the nki wrapper (layout changes, padding, GQA, scale, lse hand-over) be tested on any machine:
inject it with `recpre.attention.nki.use_kernels(standin_kernels())`. It checks the kernels' input
contract (shapes, tile multiples, grid) so a wrapper bug that real hardware would reject fails here too.
The backward recomputes probabilities from the lse it is given, as the real kernel does, so a wrong lse
layout shows up as wrong gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recpre.attention.nki import MAX_HEAD_DIM, PARTITIONS, NkiKernels, lse_to_rows, rows_to_lse

NEG_INF = -9984.0  # what the hardware kernels use in place of -inf


@dataclass(frozen=True)
class StandinFlashConfig:
    seq_tile_size: int = 2048
    attn_core_tile_size: int = 256
    training: bool = True
    should_transpose_v: bool = False
    lse_dtype: str = ""


def _scores(q_t: torch.Tensor, k_t: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q_t [b, h, d, s], k_t [b, kv_h, d, s] -> fp32 scaled scores [b, h, s, s] with kv heads shared by groups."""
    group = q_t.shape[1] // k_t.shape[1]
    k_t = k_t.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhds,bhdt->bhst", q_t.float(), k_t.float()) * scale
    if causal:
        s = scores.shape[-1]
        future = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, NEG_INF)
    return scores


class _Grid:
    def __init__(self, fn, grid_over: str):
        self.fn, self.grid_over = fn, grid_over

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn(tuple(grid), *args, **kwargs)

        return launch

    def __call__(self, *args, **kwargs):
        raise TypeError(f"NKI kernels are launched on a grid: kernel[b, {self.grid_over}](...)")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"nki stand-in: {msg}")


def _fwd(grid, q, k, v, seed, logit_bias=None, softmax_scale=None, use_causal_mask=True, mixed_precision=True,
         dropout_p=0.0, config=None):  # fmt: skip
    b, h, d, s = q.shape
    kv_h = k.shape[1]
    config = config or StandinFlashConfig()
    _check(grid == (b, h), f"forward grid {grid} must be (batch, heads) = {(b, h)}")
    _check(k.shape == (b, kv_h, d, s) and h % kv_h == 0, f"k {tuple(k.shape)} must be [b, kv_h, d, s]")
    _check(v.shape == (b, kv_h, s, d), f"v {tuple(v.shape)} must be [b, kv_h, s, d]")
    _check(d <= MAX_HEAD_DIM, f"head_dim {d} > {MAX_HEAD_DIM}")
    _check(s % config.seq_tile_size == 0 and s % PARTITIONS == 0, f"seq {s} not a multiple of the tile")
    _check(config.training and logit_bias is None and dropout_p == 0.0, "unsupported options")
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    scores = _scores(q, k, scale, use_causal_mask)
    lse_rows = torch.logsumexp(scores, dim=-1)  # [b, h, s]
    probs = torch.exp(scores - lse_rows[..., None])
    v_full = v.float().repeat_interleave(h // kv_h, dim=1)
    o = torch.matmul(probs, v_full).to(q.dtype)  # [b, h, s, d]
    return o, rows_to_lse(lse_rows)


def _bwd(grid, q, k, v, o, dy, lse, seed, logit_bias=None, use_causal_mask=True, mixed_precision=True,
         dropout_p=0.0, softmax_scale=None, sliding_window=-1):  # fmt: skip
    b, h, d, s = q.shape
    kv_h = k.shape[1]
    _check(grid == (b, kv_h), f"backward grid {grid} must be (batch, kv_heads) = {(b, kv_h)}")
    for name, t, heads in (("k", k, kv_h), ("v", v, kv_h), ("o", o, h), ("dy", dy, h)):
        _check(t.shape == (b, heads, d, s), f"{name} {tuple(t.shape)} must be [b, {heads}, d, s]")
    _check(lse.shape == (b, h, PARTITIONS, s // PARTITIONS), f"lse {tuple(lse.shape)} must be [b, h, 128, s/128]")
    _check(logit_bias is None and dropout_p == 0.0, "unsupported options")
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    group = h // kv_h
    probs = torch.exp(_scores(q, k, scale, use_causal_mask) - lse_to_rows(lse).float()[..., None])  # [b,h,s,s]
    dy_r, o_r = dy.float().transpose(-1, -2), o.float().transpose(-1, -2)  # [b, h, s, d]
    v_r = v.float().transpose(-1, -2).repeat_interleave(group, dim=1)
    k_r = k.float().transpose(-1, -2).repeat_interleave(group, dim=1)
    q_r = q.float().transpose(-1, -2)
    dv = torch.matmul(probs.transpose(-1, -2), dy_r)  # [b, h, s, d]
    dp = torch.matmul(dy_r, v_r.transpose(-1, -2))
    ds = probs * (dp - (dy_r * o_r).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(ds, k_r)
    dk = torch.matmul(ds.transpose(-1, -2), q_r)

    def to_kv(t: torch.Tensor) -> torch.Tensor:  # sum the query heads of each group
        return t.reshape(b, kv_h, group, s, d).sum(2)

    def out(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.transpose(-1, -2).contiguous().to(dtype)

    return out(dq, q.dtype), out(to_kv(dk), k.dtype), out(to_kv(dv), v.dtype)


def standin_kernels() -> NkiKernels:
    """NkiKernels backed by the pure-torch stand-in (fp32 math, outputs in the input dtype)."""
    return NkiKernels(
        fwd=_Grid(_fwd, "heads"),
        bwd=_Grid(_bwd, "kv_heads"),
        make_config=lambda tile: StandinFlashConfig(seq_tile_size=tile, training=True),
        name="standin",
    )
