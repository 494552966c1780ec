"""The NKI flash-attention kernel contract shared by the XLA path (nki.py) and the native device (nki_native.py).

`NkiKernels` is the calling convention (docs/trainium.md, "NKI kernel contract"); `aws_kernels` loads AWS's
kernels from neuronx-cc; the layout helpers pad and transpose q, k, v into the kernels' layouts and convert
the lse between the kernels' [b, h, 128, s/128] and query order.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
