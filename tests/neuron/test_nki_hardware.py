"""NKI flash-attention on a Trainium device: the backend against eager, bf16, forward and backward.

Run on a trn1/trn2 instance with the Neuron SDK installed (see tests/neuron/README.md):

    python -m pytest tests/neuron/test_nki_hardware.py -m neuron -v -s

Elsewhere every test skips with the reason. The first test checks the kernel contract the wrapper relies
on (output layout and the lse format of REFERENCE.md section 4) by calling AWS's kernel directly, so a
mismatch is reported as a contract break, not only as a wrong attention output.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = pytest.mark.neuron


def _neuron_reason() -> str | None:
    for module in ("torch_xla", "neuronxcc"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable: run on a trn1/trn2 instance with the Neuron SDK (README)"
    return None


REASON = _neuron_reason()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

import torch_xla  # noqa: E402

from recpre.attention import eager_attention, get  # noqa: E402
from recpre.attention import nki as nki_backend  # noqa: E402

# (batch, heads, kv_heads, seq, head_dim, causal): tile multiples, padding (1000, 3000), GQA, MQA, hd 64-128.
CASES = [
    (1, 4, 4, 2048, 128, True),
    (2, 8, 2, 1000, 96, True),
    (1, 8, 1, 4096, 64, True),
    (1, 4, 2, 3000, 128, True),
    (1, 4, 4, 2048, 96, False),
    (1, 4, 2, 1000, 64, False),  # non-causal padding: the bias channel
]
TOL = 1e-2  # relative (Frobenius) error against fp32 eager on the same bf16 inputs


def _device():
    return torch_xla.device()


def _inputs(b, h, kvh, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g).bfloat16()
    k = torch.randn(b, kvh, s, d, generator=g).bfloat16()
    v = torch.randn(b, kvh, s, d, generator=g).bfloat16()
    dy = torch.randn(b, h, s, d, generator=g).bfloat16()
    return q, k, v, dy


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want).norm() / want.norm())


def test_kernel_contract_output_and_lse_layout():
    """Call flash_fwd directly: o [b, h, s, d] and lse[b, h, p, t] = logsumexp of query row t*128 + p."""
    kernels = nki_backend.aws_kernels()
    b, h, s, d = 1, 2, 2048, 128
    q, k, v, _ = _inputs(b, h, h, s, d)
    scale = d**-0.5
    dev = _device()
    o, lse = kernels.fwd[b, h](
        q.transpose(-1, -2).contiguous().to(dev),
        k.transpose(-1, -2).contiguous().to(dev),
        v.to(dev),
        kernels.seed(dev),
        logit_bias=None,
        softmax_scale=scale,
        use_causal_mask=True,
        mixed_precision=True,
        dropout_p=0.0,
        config=kernels.make_config(2048),
    )
    torch_xla.sync()
    assert tuple(o.shape) == (b, h, s, d)
    assert tuple(lse.shape) == (b, h, 128, s // 128)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    want_rows = torch.logsumexp(scores, dim=-1)
    got_rows = nki_backend.lse_to_rows(lse.float().cpu())
    err = (got_rows - want_rows).abs().max().item()
    print(f"lse max abs error {err:.3e}")
    assert err < 5e-2, "lse layout/format differs from REFERENCE.md section 4 (check sign, log base, scale)"
    assert _rel(o, eager_attention(q.float(), k.float(), v.float())) < TOL


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}h{}kv{}s{}d{}-{}".format(*c[:5], "causal" if c[5] else "full")
)
def test_nki_backend_matches_eager_bf16(case):
    b, h, kvh, s, d, causal = case
    q, k, v, dy = _inputs(b, h, kvh, s, d, seed=s)
    ref_inputs = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = eager_attention(*ref_inputs, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.float())

    dev = _device()
    xq, xk, xv = (t.to(dev).requires_grad_(True) for t in (q, k, v))
    fn = get("nki")
    t0 = time.perf_counter()
    out = fn(xq, xk, xv, causal=causal)
    grads = torch.autograd.grad(out, (xq, xk, xv), dy.to(dev))
    torch_xla.sync()
    errors = [_rel(t, r) for t, r in zip((out, *grads), (ref, *ref_grads))]
    print(f"{case}: rel err o/dq/dk/dv = {', '.join(f'{e:.2e}' for e in errors)}; {time.perf_counter() - t0:.1f}s")
    assert max(errors) < TOL


def test_training_run_50_steps():
    """50 steps of a small config on Trainium with compile counts and tokens/s (issue 9, XLA fabric work).

    Stub: the XLA strategy and the trn1 launch config are owned by the Trainium/XLA helper, who completes
    this test (see README). It skips, saying so, rather than passing without running anything.
    """
    pytest.skip("not written yet: completed with the XLA fabric strategy (issue 9); see tests/neuron/README.md")
