"""The native TorchNeuron paths (recpre/neuron.py) on CPU, through a fake of the adapter's interface.

Hardware parity is tests/neuron/test_native_hardware.py; here: device choice, the collectives backend, the
compile backend, the install refusal, and the NKI attention op (registration, autograd, kernel shapes).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from attention_cases import Case, forward_backward, make_inputs
from conftest import tiny_run_args
from neuron_fake import FakeNeuronRuntime

import recpre.attention as attention
from recpre import neuron
from recpre.attention import eager_attention, nki_native
from recpre.errors import UserError
from recpre.fabric import SimpleFabric
from recpre.monitor import read_metrics
from recpre.settings import DEVICES

ROOT = Path(__file__).resolve().parents[1]
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def fabric_settings(**kw):
    base = {"strategy": "auto", "precision": "bf16-mixed", "device": "auto", "chunk_mb": 25, "timeout_s": 60}
    base.update(kw)
    return SimpleNamespace(offload=False, shard_size=0, optimizer_sharding=False, **base)


@pytest.fixture(scope="module")
def fake():
    """One fake per module: its custom ops are registered once per process."""
    rt = FakeNeuronRuntime()
    with neuron.use_runtime(rt):
        yield rt


def test_neuron_is_a_device_setting():
    assert "neuron" in DEVICES


def test_device_neuron_uses_the_runtime_device_backend_and_compile_backend(fake):
    fabric = SimpleFabric(fabric_settings(device="neuron"), env={})
    assert fabric.native_neuron and fabric.backend == fake.dist_backend == "gloo"
    assert fabric.compile_options() == {"backend": fake.compile_backend}
    assert fake.devices_asked[-1] == 0 and fake.loads >= 1
    plain = SimpleFabric(fabric_settings(device="cpu"), env={})
    assert not plain.native_neuron and plain.compile_options() == {}


def test_auto_picks_neuron_when_the_native_device_is_present():
    with neuron.use_runtime(FakeNeuronRuntime(cores=2)) as rt:
        fabric = SimpleFabric(fabric_settings(), env={})
        assert fabric.native_neuron and rt.devices_asked == [0]
    with neuron.use_runtime(FakeNeuronRuntime(cores=0)):
        assert not SimpleFabric(fabric_settings(), env={}).native_neuron


def test_neuron_device_per_local_rank_and_sharded_strategies_allowed():
    with neuron.use_runtime(FakeNeuronRuntime(cores=4)) as rt:
        env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"}
        for strategy in ("simple-ddp", "torch-ddp", "fsdp"):
            fabric = SimpleFabric(fabric_settings(device="neuron", strategy=strategy), env=env)
            assert fabric.strategy == strategy and fabric.backend == "gloo"
        assert rt.devices_asked == [3, 3, 3]


def test_neuron_without_torch_neuronx_is_refused_naming_the_install():
    install = r"torch-neuronx.*neuron-sdk-2\.33\.txt.*pip\.repos\.neuron"
    with neuron.use_runtime(FakeNeuronRuntime(installed=False)), pytest.raises(UserError, match=install):
        SimpleFabric(fabric_settings(device="neuron"), env={})
    with neuron.use_runtime(FakeNeuronRuntime(cores=0)), pytest.raises(UserError, match="no NeuronCore is visible"):
        SimpleFabric(fabric_settings(device="neuron"), env={})


def test_train_refuses_neuron_without_torch_neuronx_before_the_run_folder(tmp_path):
    """The real adapter on this machine (no torch-neuronx): exit 2, one sentence, no run folder."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fabric.device=neuron", f"run.out_dir={out}", "train.max_steps=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "torch-neuronx" in lines[0] and "neuron-sdk-2.33.txt" in lines[0], proc.stderr
    assert not out.exists()


NATIVE_CASES = [
    Case(2, 4, 4, 17, 32),  # padded 17 -> 512
    Case(1, 8, 2, 37, 64),  # GQA 4: the backward grid runs over kv heads
    Case(2, 4, 1, 63, 96, causal=False),  # non-causal padding through the bias channel
    Case(1, 2, 2, 512, 128),
]


@pytest.mark.parametrize("case", NATIVE_CASES, ids=str)
def test_native_nki_op_matches_eager_forward_and_backward(case, fake):
    q, k, v, dy, _ = make_inputs(case, seed=case.seq)
    fn = attention.get("nki")
    out, grads = forward_backward(fn, q, k, v, dy, causal=case.causal)
    ref, ref_grads = forward_backward(eager_attention, q, k, v, dy, causal=case.causal)
    torch.testing.assert_close(out, ref, **FP32)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **FP32)


def test_native_nki_registers_custom_ops_and_launches_kernels_in_their_layouts(fake):
    case = Case(2, 8, 2, 37, 64)
    q, k, v, dy, _ = make_inputs(case, seed=5)
    fake.kernels.launches.clear()
    forward_backward(attention.get("nki"), q, k, v, dy, causal=True)
    assert set(fake.ops) == {nki_native.FWD_OP, nki_native.BWD_OP}
    (fwd_name, fwd_grid, fwd_shapes, fwd_flags), (bwd_name, bwd_grid, bwd_shapes, _) = fake.kernels.launches
    assert (fwd_name, fwd_grid, bwd_name, bwd_grid) == ("fwd", (2, 8), "bwd", (2, 2))
    # q, k as [b, h, d, S]; v as [b, kv_h, S, d]; S padded to the 512 tile.
    assert fwd_shapes == [(2, 8, 64, 512), (2, 2, 64, 512), (2, 2, 512, 64)]
    assert fwd_flags == {"use_causal_mask": True, "softmax_scale": 64**-0.5}
    # backward: q, k, v, o, dy all [b, *, d, S]; lse [b, h, 128, S/128]
    assert bwd_shapes == [(2, 8, 64, 512), (2, 2, 64, 512), (2, 2, 64, 512), (2, 8, 64, 512), (2, 8, 64, 512),
                          (2, 8, 128, 4)]  # fmt: skip


def test_native_nki_refuses_document_masks(fake):
    q, k, v, _, _ = make_inputs(Case(1, 2, 2, 16, 32), seed=1)
    doc_ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(UserError, match="document mask"):
        nki_native.native_attention(q, k, v, doc_ids=doc_ids)
    with pytest.raises(UserError, match="document mask"):
        attention.get("nki")(q, k, v, doc_ids=doc_ids)


def test_auto_on_the_neuron_device_is_sdpa_until_hardware_checked():
    assert attention.resolve_auto("neuron") == "sdpa"


def ddp_on_fake_neuron(strategy: str) -> None:
    """One rank: a fabric on the (fake) neuron device opens the runtime's backend and averages gradients.
    One process group per launch: re-opening one on the same port would race its own teardown."""
    rt = FakeNeuronRuntime(cores=2)
    with neuron.use_runtime(rt):
        fabric = SimpleFabric(fabric_settings(device="neuron", strategy=strategy, precision="fp32"))
        torch.manual_seed(fabric.rank)  # different weights per rank: setup_model must make them agree
        model = fabric.setup_model(torch.nn.Linear(3, 2))
        assert dist.get_backend() == rt.dist_backend and fabric.native_neuron
        x = torch.full((4, 3), float(fabric.rank + 1))
        model(x).sum().backward()
        fabric.all_reduce_gradients(model)
        weight = fabric.unwrap(model).weight
        expected = torch.full((2, 3), 4 * (1 + 2) / 2)  # the mean over ranks of 4 * (rank + 1)
        torch.testing.assert_close(weight.grad, expected)
        gathered = [torch.zeros_like(weight) for _ in range(fabric.world_size)]
        dist.all_gather(gathered, weight.detach())
        torch.testing.assert_close(gathered[0], gathered[1])
        fabric.teardown()
        print(f"rank {fabric.rank} devices {rt.devices_asked} ok", flush=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["simple-ddp", "torch-ddp"])
def test_two_process_ddp_on_the_neuron_device_through_the_runtime_backend(strategy):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, "ddp", strategy], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0 and f"rank {rank} devices [{rank}] ok" in out, err


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    ddp_on_fake_neuron(sys.argv[2])


def test_compile_through_the_runtime_backend_does_not_recompile_across_depths(fake):
    from torch._dynamo.utils import counters

    from recpre.config import ModelConfig
    from recpre.model import build_model, compile_blocks

    fabric = SimpleFabric(fabric_settings(device="neuron", precision="fp32"), env={})
    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent", n_embd=32, n_heads=2, intermediate_size=64)
    model = fabric.setup_model(build_model(config))
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(fabric.unwrap(model), **fabric.compile_options())  # as train.py does
    ids = torch.randint(0, 100, (2, 16))
    seen = []
    for steps in (1, 2, 5, 3):
        model(ids, labels=ids, num_steps=steps).loss.backward()
        seen.append(counters["stats"]["unique_graphs"])
    assert seen[0] >= 1 and seen == [seen[0]] * 4, seen
    assert fake.compiled  # the graphs went through the runtime's compile backend


def test_train_py_runs_on_the_neuron_device_with_eager_steps_and_compiled_blocks(
    fake, train_module, tiny_corpus, tmp_path
):
    """The whole driver on the (fake) native device: device, backend, compile backend, EagerStep."""
    from recpre.step_backends import EagerStep, XlaStep, step_backend

    fake.compiled.clear()
    asked = len(fake.devices_asked)
    argv = tiny_run_args(tmp_path / "run", tiny_corpus, "fabric.device=neuron", "model.compile=true")
    argv += ["train.max_steps=5", "eval.interval=0", "checkpoint.interval=0"]
    assert train_module.main(argv) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert len(fake.devices_asked) > asked and fake.compiled  # train.py compiled through the runtime's backend
    backend = step_backend("single", None)
    assert type(backend) is EagerStep and not isinstance(backend, XlaStep)
