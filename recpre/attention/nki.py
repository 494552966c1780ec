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
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recpre import neuron
from recpre.attention import eager_attention, register
from recpre.errors import UserError

PARTITIONS = 128  # lse rows are split over the 128 SBUF partitions
MAX_HEAD_DIM = 128
MAX_SEQ_TILE = 2048
MIN_SEQ_TILE = 512
PAD_SCORE = -1.0e4  # score given to padded keys in non-causal attention; exp() of it is 0 in fp32 and bf16

_EXTRA = (
    "the Neuron SDK 2.29 (torch-neuronx, neuronx-cc) from AWS's package index on a trn1/trn2 instance; "
    "see tests/neuron/README.md"
)


@dataclass(frozen=True)
class NkiKernels:
    """A pair of flash-attention kernels with AWS's calling convention (see the module docstring)."""

    fwd: Any  # grid-indexable: fwd[b, h](...)
    bwd: Any  # grid-indexable: bwd[b, kv_h](...)
    make_config: Callable[[int], Any]  # seq_tile_size -> the forward's `config` object (training=True)
    name: str = "custom"
    seed: Callable[[torch.device], Any] = lambda device: None  # dropout seed argument; unused at dropout 0


def aws_kernels() -> NkiKernels:
    """AWS's flash_fwd / flash_attn_bwd from neuronx-cc; a UserError naming the install off Neuron."""
    try:
        attention = importlib.import_module("neuronxcc.nki.kernels.attention")
    except ImportError as err:
        raise UserError(f"model.attention: nki needs {_EXTRA} ({err}).") from err
    config_cls = attention.FlashConfig

    def make_config(seq_tile_size: int) -> Any:
        return config_cls(seq_tile_size=seq_tile_size, training=True)

    return NkiKernels(fwd=attention.flash_fwd, bwd=attention.flash_attn_bwd, make_config=make_config, name="aws")


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


def padded_length(seq: int) -> tuple[int, int]:
    """(padded sequence length, seq_tile_size): powers of two from 512 up to 2048, then multiples of 2048."""
    if seq <= MAX_SEQ_TILE:
        padded = max(MIN_SEQ_TILE, 1 << (seq - 1).bit_length())
        return padded, padded
    return math.ceil(seq / MAX_SEQ_TILE) * MAX_SEQ_TILE, MAX_SEQ_TILE


def lse_to_rows(lse: torch.Tensor) -> torch.Tensor:
    """Kernel lse [b, h, 128, s/128] -> [b, h, s] in query order (row t*128 + p is lse[..., p, t])."""
    b, h, p, t = lse.shape
    return lse.transpose(-1, -2).reshape(b, h, t * p)


def rows_to_lse(rows: torch.Tensor) -> torch.Tensor:
    """[b, h, s] in query order -> the kernel's [b, h, 128, s/128] layout."""
    b, h, s = rows.shape
    return rows.reshape(b, h, s // PARTITIONS, PARTITIONS).transpose(-1, -2).contiguous()


def to_kernel_layout(q, k, v, causal: bool, scale: float):
    """Pad (sequence, and the bias channel when non-causal padding needs it) and lay out as the kernels want.

    Returns q_t [b, h, d', S], k_t [b, kv_h, d', S], v_p [b, kv_h, S, d'], seq_tile_size.
    """
    seq, head_dim = q.shape[-2], q.shape[-1]
    padded, tile = padded_length(seq)
    pad_seq = padded - seq
    bias_channel = pad_seq > 0 and not causal
    if bias_channel and head_dim >= MAX_HEAD_DIM:
        raise UserError(
            f"model.attention: nki non-causal attention at head_dim {head_dim} needs the sequence length "
            f"({seq}) to be a multiple of {tile}; pad the input or use model.attention=eager."
        )
    extra = 1 if bias_channel else 0
    qp = F.pad(q, (0, extra, 0, pad_seq))
    kp = F.pad(k, (0, extra, 0, pad_seq))
    vp = F.pad(v, (0, extra, 0, pad_seq))
    if bias_channel:
        a = math.sqrt(-PAD_SCORE / scale)
        q_bias = torch.full_like(qp[..., -1:], a)
        k_bias = torch.zeros_like(kp[..., -1:])
        k_bias[..., seq:, :] = -a
        qp = torch.cat([qp[..., :-1], q_bias], dim=-1)
        kp = torch.cat([kp[..., :-1], k_bias], dim=-1)
    return qp.transpose(-1, -2).contiguous(), kp.transpose(-1, -2).contiguous(), vp.contiguous(), tile


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
