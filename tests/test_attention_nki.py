"""The nki backend's wrapper (layouts, padding, GQA, scale, lse) on a pure-torch stand-in of the kernels.

The stand-in (recpre/attention/nki_standin.py) has the AWS kernels' exact signatures, layouts, launch grid
and lse format; it runs anywhere. Parity on the real kernels is tests/neuron/test_nki_hardware.py.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import Case, forward_backward, make_inputs

import recpre.attention as attention
from recpre.attention import eager_attention, nki
from recpre.attention.nki_standin import standin_kernels
from recpre.errors import UserError

FP32 = {"atol": 1e-5, "rtol": 1e-5}

NKI_CASES = [
    Case(2, 4, 4, 17, 32),  # padded 17 -> 512
    Case(1, 8, 2, 37, 64),  # GQA 4
    Case(2, 4, 1, 63, 96, causal=False),  # MQA, non-causal padding through the bias channel
    Case(1, 2, 2, 130, 128),  # head_dim 128, causal padding
    Case(2, 6, 3, 41, 48, causal=False),
    Case(1, 4, 2, 512, 128, causal=False),  # no padding needed: non-causal at head_dim 128 works
    Case(1, 2, 1, 512, 64),
    Case(1, 1, 1, 1, 32),
]


@pytest.fixture
def standin():
    with nki.use_kernels(standin_kernels()) as kernels:
        yield kernels


@pytest.mark.parametrize("case", NKI_CASES, ids=str)
def test_nki_wrapper_matches_eager_forward_and_backward(case, standin):
    q, k, v, dy, _ = make_inputs(case, seed=case.seq)
    fn = attention.get("nki")
    out, grads = forward_backward(fn, q, k, v, dy, causal=case.causal)
    ref, ref_grads = forward_backward(eager_attention, q, k, v, dy, causal=case.causal)
    torch.testing.assert_close(out, ref, **FP32)
    for got, want, label in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(got, want, **FP32, msg=lambda m, label=label: f"d{label}: {m}")


def test_nki_custom_scale(standin):
    q, k, v, dy, _ = make_inputs(Case(1, 4, 2, 77, 64))
    out, grads = forward_backward(attention.get("nki"), q, k, v, dy, scale=0.05)
    ref, ref_grads = forward_backward(eager_attention, q, k, v, dy, scale=0.05)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(grads, ref_grads, **FP32)


def test_nki_bf16_matches_eager(standin):
    q, k, v, dy, _ = make_inputs(Case(1, 4, 2, 100, 96, causal=False), dtype=torch.bfloat16)
    out, grads = forward_backward(attention.get("nki"), q, k, v, dy, causal=False)
    ref, ref_grads = forward_backward(eager_attention, *(t.float() for t in (q, k, v, dy)), causal=False)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert (got.float() - want).norm() / want.norm() < 1e-2


def test_padding_lengths_are_kernel_tile_multiples():
    assert nki.padded_length(1) == (512, 512)
    assert nki.padded_length(513) == (1024, 1024)
    assert nki.padded_length(2048) == (2048, 2048)
    assert nki.padded_length(2049) == (4096, 2048)
    assert nki.padded_length(4096) == (4096, 2048)


def test_lse_layout_round_trip():
    rows = torch.arange(2 * 3 * 384, dtype=torch.float32).reshape(2, 3, 384)
    lse = nki.rows_to_lse(rows)
    assert lse.shape == (2, 3, 128, 3)
    assert lse[1, 2, 5, 2] == rows[1, 2, 2 * 128 + 5]  # lse[b, h, p, t] is query row t*128 + p
    assert torch.equal(nki.lse_to_rows(lse), rows)


def test_standin_rejects_what_the_kernels_reject(standin):
    q = torch.randn(1, 2, 64, 300)  # seq not a tile multiple
    v = torch.randn(1, 2, 300, 64)
    with pytest.raises(AssertionError, match="multiple of the tile"):
        standin.fwd[1, 2](q, q, v, None, softmax_scale=0.1, config=standin.make_config(512))
    with pytest.raises(AssertionError, match="grid"):
        standin.fwd[1, 1](q, q, v, None, softmax_scale=0.1, config=standin.make_config(300))
    with pytest.raises(TypeError, match="grid"):
        standin.fwd(q, q, v, None)


def test_nki_limits_are_clear_errors(standin):
    q = torch.randn(1, 2, 40, 128)
    with pytest.raises(UserError, match="non-causal.*head_dim 128"):
        attention.get("nki")(q, q, q, causal=False)  # padding would need a bias channel beyond 128
    with pytest.raises(UserError, match="head_dim <= 128"):
        attention.get("nki")(*(torch.randn(1, 2, 8, 160),) * 3)
    with pytest.raises(UserError, match="document mask"):
        attention.get("nki")(q, q, q, doc_ids=torch.zeros(1, 40, dtype=torch.long))


def test_nki_decode_shapes_fall_back_to_eager(standin):
    q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 2, 10, 32)
    torch.testing.assert_close(attention.get("nki")(q, k, k), eager_attention(q, k, k), **FP32)


def test_nki_off_neuron_is_a_clear_error():
    if nki.is_available():
        pytest.skip("torch_xla and neuronx-cc are importable here")
    with pytest.raises(UserError, match="nki.*not available here.*torch_xla"):
        attention.get("nki")
    with pytest.raises(UserError, match="Neuron SDK"):
        nki.aws_kernels()


def test_default_kernels_can_be_replaced_for_the_process():
    q, k, v, dy, _ = make_inputs(Case(1, 4, 2, 33, 64))
    nki.set_default_kernels(standin_kernels())
    try:
        assert nki.kernels().name == "standin" and nki.is_available()
        out = attention.get("nki")(q, k, v)
    finally:
        nki.set_default_kernels(None)
    torch.testing.assert_close(out, eager_attention(q, k, v), **FP32)
