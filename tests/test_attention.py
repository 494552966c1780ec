"""Attention backends against the eager reference: forward and backward, fp32 on CPU (bf16 on a GPU)."""

from __future__ import annotations

import types
import zlib

import pytest
import torch
from attention_cases import CASES, Case, forward_backward, make_inputs, per_document_reference

import recpre.attention as attention
from recpre.attention import eager_attention, expand_kv, flash, flex
from recpre.errors import UserError

FP32 = {"atol": 1e-5, "rtol": 1e-5}
HAS_CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA/ROCm GPU on this machine"
FLEX_CPU_BWD = f"flex_attention in torch {torch.__version__} has no CPU backward (forward parity still runs)"


def _check_against_eager(name: str, case: Case, *, backward: bool = True, tol=FP32, dtype=torch.float32, dev="cpu"):
    q, k, v, dy, docs = make_inputs(case, seed=zlib.crc32(str(case).encode()) % 1000, dtype=dtype, device=dev)
    kwargs = {"causal": case.causal, "doc_ids": docs}
    fn = attention.get(name)
    if backward:
        out, grads = forward_backward(fn, q, k, v, dy, **kwargs)
        ref, ref_grads = forward_backward(attention.get("eager"), q, k, v, dy, **kwargs)
        torch.testing.assert_close(out, ref, **tol)
        for got, want, label in zip(grads, ref_grads, "qkv"):
            torch.testing.assert_close(got, want, **tol, msg=lambda m, label=label: f"d{label}: {m}")
    else:
        with torch.no_grad():
            torch.testing.assert_close(fn(q, k, v, **kwargs), eager_attention(q, k, v, **kwargs), **tol)
    if docs is not None:
        with torch.no_grad():
            sep = per_document_reference(q, k, v, docs, causal=case.causal)
            torch.testing.assert_close(fn(q, k, v, **kwargs), sep, **tol)


@pytest.mark.parametrize("case", [c for c in CASES if c.docs], ids=str)
def test_eager_masks_match_running_documents_separately(case):
    q, k, v, _, docs = make_inputs(case)
    torch.testing.assert_close(
        eager_attention(q, k, v, causal=case.causal, doc_ids=docs),
        per_document_reference(q, k, v, docs, causal=case.causal),
        **FP32,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sdpa_matches_eager(case):
    _check_against_eager("sdpa", case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flex_forward_matches_eager_on_cpu(case):
    if not flex.is_available():
        pytest.skip(flex._reason())
    _check_against_eager("flex", case, backward=False)


def test_flex_cpu_training_is_a_clear_error():
    if not flex.is_available():
        pytest.skip(flex._reason())
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(UserError, match="no CPU backward"):
        attention.get("flex")(q, q, q)


def test_flex_block_mask_is_reused_for_the_same_doc_ids():
    if not flex.is_available():
        pytest.skip(flex._reason())
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    a = flex.block_mask(8, 8, causal=True, doc_ids=docs, device=docs.device)
    assert flex.block_mask(8, 8, causal=True, doc_ids=docs, device=docs.device) is a
    other = docs.clone()
    assert flex.block_mask(8, 8, causal=True, doc_ids=other, device=docs.device) is not a
    docs[0, 1] = 1  # in-place edits bump the version counter: no stale mask
    assert flex.block_mask(8, 8, causal=True, doc_ids=docs, device=docs.device) is not a


def test_sdpa_and_flex_with_fewer_queries_than_keys():
    """Incremental decoding: queries are the last positions of the keys (bottom-right causal alignment)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 32, generator=g), torch.randn(2, 2, 11, 32, generator=g), torch.randn(2, 2, 11, 32)
    docs = torch.tensor([[0] * 6 + [1] * 5, [0] * 11])
    names = ["sdpa"] + (["flex"] if flex.is_available() else [])
    for name in names:
        for doc_ids in (None, docs):
            with torch.no_grad():
                got = attention.get(name)(q, k, v, causal=True, doc_ids=doc_ids)
            torch.testing.assert_close(got, eager_attention(q, k, v, causal=True, doc_ids=doc_ids), **FP32)


def test_custom_scale_is_honoured():
    q, k, v, dy, _ = make_inputs(Case(1, 2, 1, 19, 32))
    for name in ("sdpa",):
        out, grads = forward_backward(attention.get(name), q, k, v, dy, scale=0.3)
        ref, ref_grads = forward_backward(attention.get("eager"), q, k, v, dy, scale=0.3)
        torch.testing.assert_close(out, ref, **FP32)
        torch.testing.assert_close(grads, ref_grads, **FP32)


# --- registry -----------------------------------------------------------------------------------------


def test_unknown_backend_names_the_choices():
    with pytest.raises(UserError, match="unknown backend 'nope'.*eager.*sdpa"):
        attention.get("nope")


def test_unavailable_backend_says_why_and_how_to_install():
    if flash.is_available():
        pytest.skip("flash-attn is usable here")
    with pytest.raises(UserError, match="not available here.*flash-attn.*available: auto, eager, sdpa"):
        attention.get("flash")
    if not attention._BACKENDS["nki"].is_available():
        with pytest.raises(UserError, match="nki.*Neuron"):
            attention.get("nki")


def test_auto_picks_per_device_and_falls_back_for_documents():
    assert attention.resolve_auto("cpu") == "sdpa"
    assert attention.resolve_auto("xla", documents=True) == "eager"  # nki has no document masks
    assert attention.resolve_auto("weird-device") in attention.available()
    q, k, v, dy, docs = make_inputs(Case(2, 4, 2, 33, 32, docs="many"))
    out = attention.get("auto")(q, k, v, doc_ids=docs)
    torch.testing.assert_close(out, eager_attention(q, k, v, doc_ids=docs), **FP32)


def test_gqa_is_expanded_once_in_the_registry():
    seen = {}

    def spy(q, k, v, **kwargs):
        seen["kv_heads"] = k.shape[1]
        return eager_attention(q, k, v, **kwargs)

    attention.register("spy", spy, gqa=False)
    try:
        q, k, v, _, _ = make_inputs(Case(1, 6, 2, 9, 16))
        attention.get("spy")(q, k, v)
        assert seen["kv_heads"] == 6
    finally:
        del attention._BACKENDS["spy"]
    with pytest.raises(ValueError, match="multiple"):
        expand_kv(torch.zeros(1, 4, 2, 8), 6)


# --- flash plumbing with a torch stand-in for the flash_attn module -------------------------------------------


def _fake_flash_attn() -> types.SimpleNamespace:
    """flash_attn_func / flash_attn_varlen_func in [B, S, H, D] / [T, H, D] layouts, computed by eager."""

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        return eager_attention(q, k, v, causal=causal, scale=softmax_scale).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
        assert cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == int((cu_seqlens_q.diff()).max())
        pieces = []
        for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            pieces.append(flash_attn_func(q[None, start:end], k[None, start:end], v[None, start:end], **kw)[0])
        return torch.cat(pieces)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


@pytest.mark.parametrize("case", [c for c in CASES if c.seq > 1], ids=str)
def test_flash_wrapper_layouts_and_varlen_with_a_stand_in(case, monkeypatch):
    monkeypatch.setattr(flash, "_module", _fake_flash_attn)
    q, k, v, dy, docs = make_inputs(case, dtype=torch.bfloat16)
    kwargs = {"causal": case.causal, "doc_ids": docs}
    out, grads = forward_backward(flash.flash_attention, q, k, v, dy, **kwargs)
    ref, ref_grads = forward_backward(eager_attention, q, k, v, dy, **kwargs)
    bf16 = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, ref, **bf16)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **bf16)


def test_flash_refuses_fp32_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(flash, "_module", _fake_flash_attn)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(UserError, match="bf16"):
        flash.flash_attention(q, q, q)


# --- GPU: bf16 parity (tolerance 1e-2 relative) ------------------------------------------------------------

GPU_CASES = [
    Case(2, 8, 2, 257, 64),
    Case(1, 16, 4, 1024, 128),
    Case(2, 8, 8, 333, 96, docs="many"),
    Case(1, 8, 2, 512, 128, docs="two", causal=False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("name", ["sdpa", "flex", "flash"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_bf16_parity(name, case):
    if not attention._BACKENDS[name].is_available():
        pytest.skip(attention._BACKENDS[name].why_unavailable())
    q, k, v, dy, docs = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    kwargs = {"causal": case.causal, "doc_ids": docs}
    out, grads = forward_backward(attention.get(name), q, k, v, dy, **kwargs)
    # The reference: eager in fp32 on the same bf16 inputs.
    ref, ref_grads = forward_backward(eager_attention, *(t.float() for t in (q, k, v, dy)), **kwargs)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 1e-2, f"{name} relative error {err:.2e}"
