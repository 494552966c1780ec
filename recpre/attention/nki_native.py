"""NKI flash attention on the native TorchNeuron device: the kernels registered as PyTorch custom ops.

On the XLA path (trn1, SDK <= 2.29) recpre/attention/nki.py calls the kernels from an autograd.Function. The
native device (trn2/trn3, SDK 2.33) wants kernels registered as custom ops (the registration goes through
recpre/neuron.py, `nki_op` on hardware), so eager mode and torch.compile(backend="neuron") both see one op:

    recpre::nki_flash_fwd(q_t, k_t, v_p, causal, scale, tile) -> (o_p, lse)    with register_autograd ->
    recpre::nki_flash_bwd(q_t, k_t, v_t, o_t, dy_t, lse, causal, scale) -> (dq_t, dk_t, dv_t)

The layouts, padding and lse format are the XLA path's (recpre/attention/nki_kernels.py); the padding and
transposes around the op are plain torch ops, so autograd carries gradients through them. Document masks
are refused: the kernels have no per-document mask.
"""

from __future__ import annotations

from typing import Any

import torch

from recpre import neuron
from recpre.attention.nki_kernels import to_kernel_layout
from recpre.errors import UserError

FWD_OP = "recpre::nki_flash_fwd"
BWD_OP = "recpre::nki_flash_bwd"

_registered: dict[int, tuple[Any, Any]] = {}  # id(runtime) -> (fwd op, bwd op): one registration per runtime


def _register(rt: Any) -> tuple[Any, Any]:
    """Register the forward and backward launchers as custom ops on `rt`, with the forward's autograd."""

    def flash_fwd(
        q_t: torch.Tensor, k_t: torch.Tensor, v_p: torch.Tensor, causal: bool, scale: float, tile: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kern = rt.attention_kernels()
        o_p, lse = kern.fwd[q_t.shape[0], q_t.shape[1]](
            q_t, k_t, v_p, kern.seed(q_t.device), logit_bias=None, softmax_scale=scale, use_causal_mask=causal,
            mixed_precision=True, dropout_p=0.0, config=kern.make_config(tile),
        )  # fmt: skip
        return o_p, lse

    def flash_bwd(
        q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, o_t: torch.Tensor, dy_t: torch.Tensor,
        lse: torch.Tensor, causal: bool, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        kern = rt.attention_kernels()
        dq, dk, dv = kern.bwd[k_t.shape[0], k_t.shape[1]](
            q_t, k_t, v_t, o_t, dy_t, lse, kern.seed(q_t.device), logit_bias=None, use_causal_mask=causal,
            mixed_precision=True, dropout_p=0.0, softmax_scale=scale,
        )  # fmt: skip
        return dq, dk, dv

    fwd_op = rt.custom_op(FWD_OP, flash_fwd)
    bwd_op = rt.custom_op(BWD_OP, flash_bwd)

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q_t, k_t, v_p, causal, scale, _ = inputs
        o_p, lse = output
        ctx.save_for_backward(q_t, k_t, v_p, o_p, lse)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx: Any, d_o: torch.Tensor, _d_lse: torch.Tensor | None) -> tuple:
        q_t, k_t, v_p, o_p, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(
            q_t, k_t, kernel_major(v_p), kernel_major(o_p), kernel_major(d_o.to(o_p.dtype)), lse, ctx.causal, ctx.scale
        )
        return dq, dk, dv.transpose(-1, -2), None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


def kernel_major(t: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] -> the backward kernel's [b, h, d, s], contiguous."""
    return t.transpose(-1, -2).contiguous()


def ops() -> tuple[Any, Any]:
    """The (forward, backward) custom ops of the runtime in use, registered on first use."""
    rt = neuron.runtime()
    if id(rt) not in _registered:
        _registered[id(rt)] = _register(rt)
    return _registered[id(rt)]


def native_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Training-shaped attention through the registered NKI op; q [B, H, S, D], k/v [B, KVH, S, D]."""
    if doc_ids is not None:
        raise UserError(
            "model.attention: nki on the neuron device has no document masking (the kernels take no per-document "
            "mask); set data.document_mask=false or use model.attention=sdpa."
        )
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    q_t, k_t, v_p, tile = to_kernel_layout(q, k, v, causal, scale)
    fwd_op, _ = ops()
    o_p, _lse = fwd_op(q_t, k_t, v_p, causal, scale, tile)
    return o_p[:, :, : q.shape[-2], :head_dim]
