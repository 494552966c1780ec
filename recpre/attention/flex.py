"""The `flex` backend: torch's flex_attention with a block mask built from document ids.

Blocks that no query of a tile may see (other documents, the future) are skipped, so packed rows cost
about as much as their documents, not as a dense [S, S] mask. Compiled on CUDA (the fused kernel);
on CPU torch 2.13 runs flex forward only (no CPU backward), so training on CPU must use sdpa or eager.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

from recpre.attention import register
from recpre.errors import UserError


@functools.cache
def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    return module


def is_available() -> bool:
    return _flex_module() is not None


def _reason() -> str:
    return f"torch {torch.__version__} has no torch.nn.attention.flex_attention; install torch>=2.5"


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def _mask_mod(causal: bool, doc_ids: torch.Tensor | None, offset: int):
    """mask_mod(b, h, q_idx, kv_idx) -> bool; queries are the last seq_q of the seq_k positions."""
    if doc_ids is None:

        def causal_only(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        return causal_only

    def documents(b, h, q_idx, kv_idx):
        same = doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx]
        return same & (q_idx + offset >= kv_idx) if causal else same

    return documents


# One-entry cache: within a forward every layer (and every recurrence) sees the same doc_ids tensor.
# Keyed on the tensor object itself (weak reference) and its version counter, never on its address.
_last: dict[str, object] = {}


def block_mask(seq_q: int, seq_k: int, *, causal: bool, doc_ids: torch.Tensor | None, device: torch.device):
    """The BlockMask for these sizes and documents, or None when nothing is masked."""
    if not causal and doc_ids is None:
        return None
    key = (seq_q, seq_k, causal, str(device), None if doc_ids is None else (doc_ids._version, tuple(doc_ids.shape)))
    ref = _last.get("doc_ids")
    same_docs = doc_ids is None if ref is None else (ref() is doc_ids)
    if _last.get("key") == key and same_docs:
        return _last["mask"]
    module = _flex_module()
    batch = None if doc_ids is None else doc_ids.shape[0]
    mask = module.create_block_mask(
        _mask_mod(causal, doc_ids, seq_k - seq_q),
        B=batch,
        H=None,
        Q_LEN=seq_q,
        KV_LEN=seq_k,
        device=device,
        _compile=device.type == "cuda",
    )
    _last.update(key=key, mask=mask, doc_ids=None if doc_ids is None else weakref.ref(doc_ids))
    return mask


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with flex_attention; GQA native (enable_gqa)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise UserError(
            f"model.attention: flex has no CPU backward in torch {torch.__version__}; "
            "use model.attention=sdpa (or eager) to train on CPU."
        )
    mask = block_mask(q.shape[-2], k.shape[-2], causal=causal, doc_ids=doc_ids, device=q.device)
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():
        # Uncompiled flex (CPU) is the unfused reference path; it says so on every first call.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_module().flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


register(
    "flex",
    flex_attention,
    is_available=is_available,
    gqa=True,
    extra="torch>=2.5 (CUDA for training; CPU runs forward only)",
    devices=("cuda", "cpu"),
    unavailable_reason=_reason,
)
