"""The native TorchNeuron path on a trn2/trn3 instance (Neuron SDK 2.33, torch-neuronx 2.13/2.14).

One command (tests/neuron/README.md):

    python -m pytest tests/neuron/test_native_hardware.py -m neuron -v -s

It ends with one summary table to paste into an issue. Elsewhere every test skips with the reason; the CPU
suite checks the same code paths against a fake of recpre/neuron.py (tests/test_neuron_native.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args

from recpre import neuron

pytestmark = pytest.mark.neuron

ROOT = Path(__file__).resolve().parents[2]
if not neuron.runtime().native_device_present():
    pytest.skip(
        "no native neuron device: run on a trn2/trn3 instance with torch-neuronx 2.13+ (tests/neuron/README.md)",
        allow_module_level=True,
    )

BF16_LOSS_TOL = 0.05  # |loss_neuron - loss_cpu| per step, bf16-mixed against fp32 on CPU, over 20 steps
ATTN_TOL = 2e-2  # relative (Frobenius) error of nki against sdpa on the same bf16 inputs
TINY = ["train.max_steps=20", "log.interval=1", "eval.interval=0", "checkpoint.interval=0"]  # on tiny_run_args
RESULTS: list[tuple[str, str, str]] = []  # (check, result, detail) for the summary table


@pytest.fixture(scope="module", autouse=True)
def summary_table():
    yield
    width = max(len(c) for c, _, _ in RESULTS) if RESULTS else 10
    lines = ["", f"| {'check':<{width}} | result | detail |", f"|{'-' * (width + 2)}|--------|--------|"]
    lines += [f"| {c:<{width}} | {r:<6} | {d} |" for c, r, d in RESULTS]
    print("\n".join(lines), flush=True)


def record(check: str, ok: bool, detail: str) -> None:
    RESULTS.append((check, "PASS" if ok else "FAIL", detail))


def train(run_dir: Path, corpus, *overrides: str, nproc: int = 1) -> dict[int, float]:
    """train.py (torchrun for nproc > 1) on the debug model, tiny corpus; the logged loss per step."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    argv = [*launcher, str(ROOT / "train.py"), *tiny_run_args(run_dir, corpus, *TINY, *overrides)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_device_discovery():
    from types import SimpleNamespace

    from recpre.fabric import SimpleFabric

    settings = SimpleNamespace(strategy="auto", precision="bf16-mixed", device="auto", chunk_mb=25, timeout_s=600)
    fabric = SimpleFabric(settings, env={})
    count = neuron.runtime().device_count()
    ok = fabric.native_neuron and fabric.device.type == "neuron" and count > 0
    record("device discovery (fabric.device=auto)", ok, f"{fabric.device}, {count} logical NeuronCores visible")
    assert ok


def test_debug_run_matches_cpu_losses(tmp_path, tiny_corpus):
    cpu = train(tmp_path / "cpu", tiny_corpus, "fabric.device=cpu", "fabric.precision=fp32")
    t0 = time.perf_counter()
    dev = train(tmp_path / "neuron", tiny_corpus, "fabric.device=neuron", "fabric.precision=bf16-mixed")
    wall = time.perf_counter() - t0
    worst = max(abs(dev[s] - cpu[s]) for s in cpu)
    ok = set(dev) == set(cpu) and len(cpu) == 20 and worst < BF16_LOSS_TOL
    record("20-step debug run vs CPU", ok, f"max |dloss| {worst:.4f} (tol {BF16_LOSS_TOL}), {wall:.0f} s")
    assert ok, (cpu, dev)


@pytest.mark.parametrize("causal", [True, False])
def test_nki_attention_matches_sdpa(causal):
    from recpre.attention import get, sdpa_attention

    device = torch.device("neuron")
    g = torch.Generator().manual_seed(0)
    b, h, kvh, s, d = 1, 8, 2, 2048, 128
    q, dy = (torch.randn(b, h, s, d, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(b, kvh, s, d, generator=g).bfloat16() for _ in range(2))
    outs = {}
    for name, fn in (("nki", get("nki")), ("sdpa", sdpa_attention)):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=causal)
        out.backward(dy.to(device))
        outs[name] = [out.float().cpu(), *(t.grad.float().cpu() for t in leaves)]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    errors = [rel(a, b) for a, b in zip(outs["nki"], outs["sdpa"], strict=True)]
    ok = max(errors) < ATTN_TOL
    detail = "rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errors) + f" (tol {ATTN_TOL})"
    record(f"nki attention fwd/bwd vs sdpa ({'causal' if causal else 'full'})", ok, detail)
    assert ok


def test_two_process_ddp(tmp_path, tiny_corpus):
    single = train(tmp_path / "one", tiny_corpus, "fabric.device=neuron", "train.max_steps=5")
    two = ("fabric.device=neuron", "fabric.strategy=simple-ddp", "train.max_steps=5")
    ddp = train(tmp_path / "two", tiny_corpus, *two, nproc=2)
    worst = max(abs(ddp[s] - single[s]) for s in single)
    ok = set(ddp) == set(single) and worst < BF16_LOSS_TOL
    record("2-process DDP (simple-ddp, neuron backend)", ok, f"max |dloss| vs 1 process {worst:.4f}")
    assert ok


def test_compile_per_block_does_not_recompile_across_depths():
    from torch._dynamo.utils import counters

    from recpre.config import ModelConfig
    from recpre.model import build_model, compile_blocks

    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent", n_embd=64, n_heads=4, intermediate_size=128)
    model = build_model(config).to("neuron")
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend=neuron.runtime().compile_backend)
    ids = torch.randint(0, 100, (2, 256), device="neuron")
    graphs, t0 = [], time.perf_counter()
    for steps in (1, 2, 5, 3, 8):
        model(ids, labels=ids, num_steps=steps).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    ok = graphs == [graphs[0]] * len(graphs)
    record(
        "compile per block, depths 1/2/5/3/8", ok, f"graphs after each depth {graphs}, {time.perf_counter() - t0:.0f} s"
    )
    assert ok
