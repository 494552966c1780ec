"""Interchangeable attention backends behind one call.

The layout at this interface, documented once:

    fn(q, k, v, *, causal=True, doc_ids=None, scale=None) -> out
    q:       [batch, heads, seq, head_dim]
    k, v:    [batch, kv_heads, seq, head_dim]   (kv_heads divides heads: grouped-query attention)
    doc_ids: [batch, seq_k] integer document ids or None; a query attends only to keys of its own document.
             Documents are contiguous runs (recpre.attention.documents.document_ids): varlen kernels
             (flash) treat every run of equal ids as one document.
    out:     [batch, heads, seq, head_dim], dtype of q

Queries may be fewer than keys (decoding): they are then the last positions, causal bottom-right aligned.

Grouped-query attention is handled here, once: a backend registered with `gqa=False` receives k and v
already expanded to `heads`. `get("auto")` returns a dispatcher that picks the best available backend
for the device of the tensors it is called with (skipping backends that cannot take doc_ids for masked
calls). Backends: eager, sdpa (here), flex, flash, nki (own modules, registered when importable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from recpre.errors import UserError

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    is_available: Callable[[], bool]
    gqa: bool  # True when the backend handles kv_heads < heads itself
    extra: str  # how to get it when it is missing
    devices: tuple[str, ...]  # device types it runs on
    documents: bool = True  # False when it cannot take doc_ids (auto then skips it for masked calls)
    unavailable_reason: Callable[[], str] | None = None  # why is_available() is False, for the error message

    def why_unavailable(self) -> str:
        reason = self.unavailable_reason() if self.unavailable_reason is not None else ""
        return reason or f"install: {self.extra}"


_BACKENDS: dict[str, Backend] = {}
# Preference order for `auto`, per device type.
# neuron: nki is chosen explicitly until tests/neuron has passed on trn2 (docs/trainium.md).
_AUTO_ORDER = {
    "cuda": ("flash", "sdpa"),
    "xla": ("nki", "eager"),
    "neuron": ("sdpa",),
    "cpu": ("sdpa",),
    "mps": ("sdpa",),
}


def register(
    name: str,
    fn: AttentionFn,
    *,
    is_available: Callable[[], bool] = lambda: True,
    gqa: bool = False,
    extra: str = "",
    devices: tuple[str, ...] = ("cpu", "cuda", "mps", "neuron", "xla"),
    documents: bool = True,
    unavailable_reason: Callable[[], str] | None = None,
) -> None:
    """Add (or replace) a backend. `fn` takes q, k, v and the keywords causal, doc_ids, scale."""
    _BACKENDS[name] = Backend(name, fn, is_available, gqa, extra, devices, documents, unavailable_reason)


def expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat each kv head so that k/v have `heads` heads (grouped-query attention)."""
    kv_heads = k.shape[1]
    if kv_heads == heads:
        return k
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    return k.repeat_interleave(heads // kv_heads, dim=1)


def _with_gqa(backend: Backend) -> AttentionFn:
    if backend.gqa:
        return backend.fn

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        return backend.fn(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]), **kwargs)

    return call


def available() -> list[str]:
    """Names of the backends that can run in this environment (optional modules included)."""
    _load_optional_backends()
    return [name for name, b in _BACKENDS.items() if b.is_available()]


def get(name: str) -> AttentionFn:
    """The attention function registered as `name` (or `auto`); a clear error when it cannot run here."""
    _load_optional_backends()
    if name == "auto":
        return _auto
    if name not in _BACKENDS:
        raise UserError(
            f"model.attention: unknown backend '{name}'; choose one of auto, {', '.join(sorted(_BACKENDS))}."
        )
    backend = _BACKENDS[name]
    if not backend.is_available():
        missing = [f"{b.name} ({b.extra})" for b in _BACKENDS.values() if not b.is_available()]
        raise UserError(
            f"model.attention: backend '{name}' is not available here ({backend.why_unavailable()}); "
            f"available: auto, {', '.join(available())}; to get the others: {'; '.join(missing)}."
        )
    return _with_gqa(backend)


def resolve_auto(device_type: str, *, documents: bool = False) -> str:
    """The backend `auto` uses on a device type (`documents`: for calls that carry doc_ids)."""
    _load_optional_backends()
    order = _AUTO_ORDER.get(device_type, ("sdpa",))
    if documents and device_type == "cuda":
        # Without flash-attn, sdpa would need a dense [B, S, S] mask; flex does documents blockwise.
        order = ("flash", "flex", "sdpa")
    for name in order:
        b = _BACKENDS.get(name)
        if b is None or device_type not in b.devices or (documents and not b.documents):
            continue
        if b.is_available():
            return name
    return "eager"


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    name = resolve_auto(q.device.type, documents=kwargs.get("doc_ids") is not None)
    return _with_gqa(_BACKENDS[name])(q, k, v, **kwargs)


def attention_mask(
    seq_q: int, seq_k: int, *, causal: bool, doc_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [batch or 1, 1, seq_q, seq_k], True where a query may attend; None when nothing is masked.

    Queries are the last `seq_q` positions of the `seq_k` keys (as in incremental decoding).
    """
    mask = None
    if causal:
        offset = seq_k - seq_q
        qpos = torch.arange(seq_q, device=device)[:, None] + offset
        kpos = torch.arange(seq_k, device=device)[None, :]
        mask = (kpos <= qpos)[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, -seq_q:, None] == doc_ids[:, None, :]
        same_doc = same_doc[:, None]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference: explicit scores, softmax in float32. The ground truth for every other backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    mask = attention_mask(q.shape[-2], k.shape[-2], causal=causal, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention; document masks go in as a dense boolean mask."""
    gqa = k.shape[1] != q.shape[1]
    if doc_ids is None and (not causal or q.shape[-2] == k.shape[-2]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = attention_mask(q.shape[-2], k.shape[-2], causal=causal, doc_ids=doc_ids, device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


register("eager", eager_attention, gqa=True, extra="built in")
register("sdpa", sdpa_attention, gqa=True, extra="built in")

_optional_loaded = False


def _load_optional_backends() -> None:
    """Import the backends that live in their own modules (flex, flash, nki); each registers itself."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for module in ("flex", "flash", "nki"):
        try:
            importlib.import_module(f"recpre.attention.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"recpre.attention.{module}":
                raise
