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


TRAIN_CASES = {
    # name: overrides; accumulation 1 (world batch = micro batch), no validation: the training step's graphs only
    "eager-attention": ["model.attention=auto", "model.overrides.block_size=256"],
    "nki-attention": ["model.attention=nki", "model.overrides.block_size=2048", "train.micro_batch_size=1"],
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_run_50_steps(case, tmp_path):
    """50 steps of the debug recurrent model on one NeuronCore (bf16-true): compile counts and tokens/s.

    The compile count must be the same after every step (graph-stable recurrence: sampled depths vary) and at
    most 4 graphs; the loss must fall. Prints the per-step graph count and the tokens/s after compilation.
    """
    import json
    import os
    import statistics
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    micro = 1 if "train.micro_batch_size=1" in TRAIN_CASES[case] else 4
    args = [
        f"run.out_dir={tmp_path / case}",
        "run.resume=never",
        "fabric.strategy=xla",
        "fabric.device=auto",
        "fabric.precision=bf16-true",
        "train.max_steps=50",
        f"train.micro_batch_size={micro}",
        f"train.world_batch_size={micro}",
        "train.loss_spike_factor=null",
        "schedule.warmup_steps=5",
        "schedule.cooldown_steps=10",
        "eval.interval=0",
        "checkpoint.interval=0",
        "log.interval=10",
        "log.progress=lines",
        "log.plot=false",
        *TRAIN_CASES[case],
    ]
    env = {
        **os.environ,
        "PJRT_DEVICE": "NEURON",
        "NEURON_RT_VISIBLE_CORES": os.environ.get("NEURON_RT_VISIBLE_CORES", "0"),
        "NEURON_CC_FLAGS": os.environ.get("NEURON_CC_FLAGS", "--model-type transformer"),
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1",
        "MALLOC_ARENA_MAX": "64",
        "WANDB_MODE": "disabled",
    }
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in (tmp_path / case / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    graphs = [r["xla_graphs"] for r in rows]
    depths = [tuple(r["depth"]) for r in rows]
    steady = [r["tokens_per_s"] for r in rows[5:]]
    print(
        f"\n{case}: 50 steps in {wall:.0f}s (compiles included); graphs after each step: {graphs}\n"
        f"depths: {depths}\nloss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; "
        f"tokens/s after compilation: median {statistics.median(steady):.0f}, max {max(steady):.0f}"
    )
    assert len(rows) == 50
    assert graphs == [graphs[0]] * len(graphs) and graphs[-1] <= 4, f"graphs kept compiling: {graphs}"
    assert rows[-1]["loss"] < rows[0]["loss"]
