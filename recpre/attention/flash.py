"""The `flash` backend: the flash-attn package (CUDA, ROCm builds too) when it is installed.

Documents go in as cumulative sequence lengths (the varlen kernel): each run of equal doc ids in a row is
one sequence, so nothing attends across documents and no mask is materialised. GQA is native.
"""

from __future__ import annotations

import functools
import importlib

import torch

from recpre.attention import register
from recpre.attention.documents import document_segments
from recpre.errors import UserError

_EXTRA = "pip install flash-attn --no-build-isolation (CUDA or ROCm GPU)"


@functools.cache
def _module():
    """The flash_attn module or None; tests may monkeypatch this to inject a stand-in."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def is_available() -> bool:
    return _module() is not None and torch.cuda.is_available()


def _reason() -> str:
    if _module() is None:
        return f"the flash-attn package is not installed ({_EXTRA})"
    return "flash-attn is installed but no CUDA/ROCm device is visible"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, KVH, S, D] -> [B, H, S, D]; flash-attn works in [B, S, H, D]."""
    fa = _module()
    if fa is None:
        raise UserError(f"model.attention: flash needs the flash-attn package: {_EXTRA}.")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise UserError(
            f"model.attention: flash-attn runs in bf16/fp16, got {q.dtype}; "
            "set fabric.precision=bf16-mixed (or bf16-true), or use model.attention=sdpa."
        )
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if doc_ids is None:
        out = fa.flash_attn_func(qt, kt, vt, causal=causal, softmax_scale=scale)
        return out.transpose(1, 2)
    if seq_q != seq_k:
        raise UserError("model.attention: flash with doc_ids needs as many queries as keys (training shapes).")
    cu_seqlens, max_seqlen = document_segments(doc_ids)
    out = fa.flash_attn_varlen_func(
        qt.reshape(batch * seq_q, heads, head_dim),
        kt.reshape(batch * seq_k, k.shape[1], head_dim),
        vt.reshape(batch * seq_k, v.shape[1], v.shape[-1]),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        causal=causal,
        softmax_scale=scale,
    )
    return out.reshape(batch, seq_q, heads, v.shape[-1]).transpose(1, 2)


register(
    "flash",
    flash_attention,
    is_available=is_available,
    gqa=True,
    extra=_EXTRA,
    devices=("cuda",),
    unavailable_reason=_reason,
)
