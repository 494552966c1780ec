"""The `nki` backend: NKI flash-attention kernels on AWS Trainium (torch-neuronx / PyTorch-XLA).

The kernels are reached through a small adapter (`NkiKernels`): AWS's kernels that ship with neuronx-cc
by default, or anything with the same calling convention (a kernel of our own, the newer `nki` dialect, or
the pure-torch stand-in the CPU tests inject). The kernel contract (docs/trainium.md, "NKI kernel contract"):

    fwd[b, h](q, k, v, seed, logit_bias=None, softmax_scale=, use_causal_mask=, mixed_precision=True,
              dropout_p=0.0, config=make_config(seq_tile_size)) -> (o, lse)
        q, k [b, h|kv_h, d, s]; v [b, kv_h, s, d]; o [b, h, s, d]; lse [b, h, 128, s/128] (fp32),
        lse[b, h, p, t] = logsumexp of the scaled scores of query row t*128 + p
    bwd[b, kv_h](q, k, v, o, dy, lse, seed, logit_bias=None, use_causal_mask=, mixed_precision=True,
                 dropout_p=0.0, softmax_scale=) -> (dq, dk, dv)
        every tensor in and out in [b, *, d, s]; the grid runs over kv heads (GQA native)

The wrapper pads the sequence to the kernel's tile multiple. Causal: padding at the end is invisible to
real queries, and padded query rows get zero output gradient, so they add nothing to dk/dv. Non-causal:
real queries would attend to padded keys, so one extra head-dim channel carries a large negative score to
every padded key (q channel = a, padded k channel = -a, real k channel = 0: real scores are unchanged and
padded keys get weight exp(-1e4) = 0); that needs head_dim < 128. Document masks are not supported by the
AWS kernels (auto falls back to eager for masked calls on XLA). On the native TorchNeuron device (trn2/trn3)
the same kernels run as registered custom ops: recpre/attention/nki_native.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from recpre import neuron
from recpre.attention import eager_attention, register
from recpre.attention.nki_kernels import (  # noqa: F401 -- the contract's names, re-exported for callers
    _EXTRA,
    MAX_HEAD_DIM,
    MAX_SEQ_TILE,
    MIN_SEQ_TILE,
    PAD_SCORE,
    PARTITIONS,
    NkiKernels,
    aws_kernels,
    lse_to_rows,
    padded_length,
    rows_to_lse,
    to_kernel_layout,
)
from recpre.errors import UserError

_override: list[NkiKernels] = []
_default: list[NkiKernels] = []  # set_default_kernels: replaces AWS's for the whole process


def set_default_kernels(kernels: NkiKernels | None) -> None:
    """Use these kernels instead of AWS's from now on (None: back to AWS's)."""
    _default.clear()
    if kernels is not None:
        _default.append(kernels)


@contextlib.contextmanager
def use_kernels(kernels: NkiKernels) -> Iterator[NkiKernels]:
    """Run the nki backend on these kernels inside the block (tests, or a kernel of our own)."""
    _override.append(kernels)
    try:
        yield kernels
    finally:
        _override.remove(kernels)


def kernels() -> NkiKernels:
    """The kernels in use: use_kernels() inside a block, else set_default_kernels(), else AWS's."""
    if _override:
        return _override[-1]
    return _default[0] if _default else _cached_aws_kernels()


@functools.cache
def _cached_aws_kernels() -> NkiKernels:
    return aws_kernels()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_available() -> bool:
    if _override or _default or neuron.runtime().installed():
        return True
    return _importable("torch_xla") and _importable("neuronxcc")


def _reason() -> str:
    missing = [m for m in ("torch_xla", "neuronxcc") if not _importable(m)]
    return (
        f"{', '.join(missing)} not importable: nki runs only on Trainium, with {_EXTRA} (trn1, XLA), "
        f"or torch-neuronx 2.13+ ({neuron.INSTALL_STEPS})"
    )


class NkiFlashAttention(torch.autograd.Function):
    """Causal or full attention through the NKI kernels; q [B, H, S, D], k/v [B, KVH, S, D]."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        kern = kernels()
        batch, heads, seq, head_dim = q.shape
        q_t, k_t, v_p, tile = to_kernel_layout(q, k, v, causal, scale)
        seed = kern.seed(q.device)
        o_p, lse = kern.fwd[batch, heads](
            q_t,
            k_t,
            v_p,
            seed,
            logit_bias=None,
            softmax_scale=scale,
            use_causal_mask=causal,
            mixed_precision=True,
            dropout_p=0.0,
            config=kern.make_config(tile),
        )
        ctx.save_for_backward(q_t, k_t, v_p, o_p, lse)
        ctx.causal, ctx.scale, ctx.seq, ctx.head_dim, ctx.kern = causal, scale, seq, head_dim, kern
        return o_p[:, :, :seq, :head_dim]

    @staticmethod
    def backward(ctx, dy):
        q_t, k_t, v_p, o_p, lse = ctx.saved_tensors
        seq, head_dim, kern = ctx.seq, ctx.head_dim, ctx.kern
        batch, kv_heads = k_t.shape[0], k_t.shape[1]
        padded, width = o_p.shape[-2], o_p.shape[-1]
        dy_p = F.pad(dy.to(o_p.dtype), (0, width - head_dim, 0, padded - seq))
        dq, dk, dv = kern.bwd[batch, kv_heads](
            q_t,
            k_t,
            v_p.transpose(-1, -2).contiguous(),
            o_p.transpose(-1, -2).contiguous(),
            dy_p.transpose(-1, -2).contiguous(),
            lse,
            kern.seed(dy.device),
            logit_bias=None,
            use_causal_mask=ctx.causal,
            mixed_precision=True,
            dropout_p=0.0,
            softmax_scale=ctx.scale,
        )

        def back(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, :head_dim, :seq].transpose(-1, -2)

        return back(dq), back(dk), back(dv), None, None


def nki_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Training-shaped attention (as many queries as keys) through the NKI kernels; GQA native."""
    if doc_ids is not None:
        raise UserError(
            "model.attention: nki has no document masking yet; set data.document_mask=false or use "
            "model.attention=eager (auto does that for masked calls)."
        )
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM or v.shape[-1] != head_dim:
        raise UserError(f"model.attention: nki needs head_dim <= {MAX_HEAD_DIM} (equal for q/k/v), got {head_dim}.")
    if q.shape[-2] != k.shape[-2]:
        # Incremental decoding (fewer queries than keys) is not what the training kernels do.
        return eager_attention(q, k, v, causal=causal, scale=scale)
    if q.device.type == neuron.runtime().device_type:  # the native TorchNeuron device: the registered op
        from recpre.attention.nki_native import native_attention

        return native_attention(q, k, v, causal=causal, scale=scale)
    scale = head_dim**-0.5 if scale is None else scale
    return NkiFlashAttention.apply(q, k, v, causal, scale)


register(
    "nki",
    nki_attention,
    is_available=is_available,
    gqa=True,
    extra=_EXTRA,
    devices=("xla", neuron.DEVICE_TYPE),
    documents=False,
    unavailable_reason=_reason,
)
