"""SimpleFabric: launch-environment parsing, precision, and real multi-process gloo groups (2 and 3 ranks).

Multi-process cases start this file as a script once per rank (`python tests/test_fabric.py SCENARIO`) with
torchrun-style variables, so they exercise the same discovery and rendezvous code as a real launch.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from recpre.distributed_env import ProcessInfo, discover_processes, parse_slurm_nodelist, slurm_port
from recpre.errors import UserError
from recpre.fabric import FabricError, SimpleFabric

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def settings(**kw):
    base = dict(strategy="auto", precision="fp32", device="cpu", chunk_mb=1.0, timeout_s=30)
    base.update(kw)
    return SimpleNamespace(**base)


# ---------------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node07", ["node07"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu-[001-003]-x", ["gpu-001-x", "gpu-002-x", "gpu-003-x"]),
        ("frontier[08-10]", ["frontier08", "frontier09", "frontier10"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("r[1-2]-g[1,3]", ["r1-g1", "r1-g3", "r2-g1", "r2-g3"]),
        ("c1,c2,x[5]", ["c1", "c2", "x5"]),
        ("host.domain.org", ["host.domain.org"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-04", "node01]", "node[04-01]", "node[a-b]", "a,,b", "n[[1]]"])
def test_parse_slurm_nodelist_rejects(bad):
    with pytest.raises(UserError):
        parse_slurm_nodelist(bad)


def test_discover_single_by_default():
    assert discover_processes({}) == ProcessInfo(0, 1, 0, "127.0.0.1", 0, "single")
    assert discover_processes({"PATH": "/bin"}).source == "single"


def test_discover_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500"}
    assert discover_processes(env) == ProcessInfo(5, 8, 1, "10.0.0.2", 29500, "torchrun")


SLURM = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "frontier[00012-00013,00020]",
    "SLURM_JOB_ID": "1234567",
}


def test_discover_slurm():
    info = discover_processes(SLURM)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (9, 16, 1, "slurm")
    assert info.master_addr == "frontier00012"
    assert info.master_port == slurm_port(1234567)
    assert 1024 < info.master_port < 32768  # unprivileged, below the Linux ephemeral range
    # the port is a function of the job id only: the same on every task, different for the next job
    assert discover_processes({**SLURM, "SLURM_PROCID": "0"}).master_port == info.master_port
    assert discover_processes({**SLURM, "SLURM_JOB_ID": "1234568"}).master_port != info.master_port


def test_discover_slurm_overrides_and_step_tasks():
    env = {**SLURM, "MASTER_ADDR": "login1", "MASTER_PORT": "4000", "SLURM_STEP_NUM_TASKS": "12"}
    info = discover_processes(env)
    assert (info.master_addr, info.master_port, info.world_size) == ("login1", 4000, 12)


def test_torchrun_wins_over_slurm():
    env = {**SLURM, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "a", "MASTER_PORT": "44000"}
    assert discover_processes(env) == ProcessInfo(3, 4, 3, "a", 44000, "torchrun")


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "x", "WORLD_SIZE": "2", "MASTER_PORT": "1"},
        {"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"},
        {"RANK": "0", "WORLD_SIZE": "2"},
        {**SLURM, "SLURM_PROCID": "16"},
        {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"},
        {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"},
    ],
)
def test_discover_rejects_inconsistent_env(env):
    with pytest.raises(UserError):
        discover_processes(env)


def test_strategy_and_settings_validation():
    assert SimpleFabric(settings(), env={}).strategy == "single"
    two = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    fabric = SimpleFabric(settings(), env=two)
    assert (fabric.strategy, fabric.rank, fabric.world_size, fabric.is_main, fabric.backend) == (
        "simple-ddp",
        1,
        2,
        False,
        "gloo",
    )
    with pytest.raises(UserError, match="fabric.strategy=single"):
        SimpleFabric(settings(strategy="single"), env=two)
    for key, value in [("strategy", "deepspeed"), ("precision", "fp16"), ("device", "tpu"), ("chunk_mb", 0)]:
        with pytest.raises(UserError, match=f"fabric.{key}"):
            SimpleFabric(settings(**{key: value}), env={})


def test_xla_without_torch_xla_is_a_user_error():
    pytest.importorskip("torch", reason="always present")
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="torch_xla"):
            SimpleFabric(settings(strategy="xla"), env={})
    else:
        pytest.skip("torch_xla is installed; the Trainium tests cover this strategy")


def test_rank0_prints_only(capsys):
    SimpleFabric(settings(), env={}).print("hello", 1)
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}
    SimpleFabric(settings(), env=env).print("hidden")
    assert capsys.readouterr().out == "hello 1\n"


def test_single_process_helpers():
    fabric = SimpleFabric(settings(), env={})
    assert fabric.launch() is fabric and not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert fabric.all_reduce(t, op="mean") is t and t.tolist() == [1.0, 2.0]
    assert fabric.all_reduce(3, op="max") == 3.0
    assert fabric.any_rank(True) and not fabric.any_rank(False)
    assert fabric.broadcast_object({"a": 1}) == {"a": 1}
    assert fabric.loss_normalizer(17) == 17.0
    fabric.barrier()
    fabric.sync()
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.grad.clone()
    fabric.all_reduce_gradients(model)
    assert torch.equal(model.weight.grad, before)
    fabric.teardown()


def test_seed_everything():
    fabric = SimpleFabric(settings(), env={"RANK": "2", "WORLD_SIZE": "4", "MASTER_PORT": "1"})
    assert fabric.seed_everything(10) == 10
    a = torch.rand(3)
    assert fabric.seed_everything(10, per_rank=True) == 12
    b = torch.rand(3)
    fabric.seed_everything(10)
    assert torch.equal(torch.rand(3), a) and not torch.equal(a, b)


def test_precision_modes():
    x = torch.randn(4, 8)
    fp32 = SimpleFabric(settings(precision="fp32"), env={})
    with fp32.autocast():
        assert nn.Linear(8, 8)(x).dtype == torch.float32

    mixed = SimpleFabric(settings(precision="bf16-mixed"), env={})
    model = mixed.setup_model(nn.Linear(8, 8))
    with mixed.autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16 and model.weight.dtype == torch.float32  # fp32 master weights
    out.float().sum().backward()
    assert model.weight.grad.dtype == torch.float32

    true = SimpleFabric(settings(precision="bf16-true"), env={})
    model = true.setup_model(nn.Linear(8, 8))
    assert model.weight.dtype == torch.bfloat16
    with true.autocast():
        assert model(x.bfloat16()).dtype == torch.bfloat16


def test_unwrap_compiled_wrapper():
    fabric = SimpleFabric(settings(), env={})
    inner = nn.Linear(2, 2)
    wrapper = nn.Module()
    wrapper._orig_mod = inner
    assert fabric.unwrap(wrapper) is inner and fabric.unwrap(inner) is inner


# ---------------------------------------------------------------------------------------------------- multi-process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_group(world: int, scenario: str, *, timeout_s: float = 20, ports: list[int] | None = None):
    """Start `world` ranks of this file; returns their Popen objects (stdout/stderr piped)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(ports[rank] if ports else port),
            "FABRIC_TIMEOUT_S": str(timeout_s),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), scenario],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs, deadline_s: float):
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=deadline_s)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_in_real_group(world):
    results = finish(launch_group(world, "collectives"), deadline_s=120)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out}\n{err}"
        assert "collectives ok" in out


@pytest.mark.parametrize("scenario", ["die", "stall"])
def test_lost_rank_fails_survivors_within_timeout(scenario):
    """Rank 2 of 3 exits (or hangs) after the start-up; ranks 0 and 1 must stop with a clear error, not hang."""
    timeout_s = 6.0
    procs = launch_group(3, scenario, timeout_s=timeout_s)
    survivors, lost = procs[:2], procs[2]
    try:
        # the lost rank prints once the group is up; from then on the clock runs
        line = lost.stdout.readline()
        assert "started" in line, line + lost.stderr.read()
        t0 = time.monotonic()
        results = finish(survivors, deadline_s=timeout_s + 40)
        elapsed = time.monotonic() - t0
    finally:
        lost.kill()
        lost.wait()
    for rank, (code, out, err) in enumerate(results):
        assert code != 0, f"rank {rank} should have failed:\n{out}\n{err}"
        assert "FabricError: the gradient all-reduce failed" in err, err
        assert "another rank died or stalled" in err and "fabric.timeout_s=6s" in err, err
    assert elapsed < timeout_s + 20, f"survivors took {elapsed:.1f}s for a {timeout_s}s timeout"


def test_unreachable_master_fails_fast_with_address():
    """Rank 1 is pointed at a port where no one listens: both ranks fail within the timeout, naming MASTER_PORT."""
    timeout_s = 4.0
    good, bad = free_port(), free_port()
    results = finish(launch_group(2, "startup", timeout_s=timeout_s, ports=[good, bad]), deadline_s=timeout_s + 60)
    for rank, (code, out, err) in enumerate(results):
        assert code != 0, f"rank {rank} should have failed:\n{out}\n{err}"
        assert "FabricError" in err and "MASTER_PORT=" in err, err
        # timed inside the rank, from the call to launch(): python start-up on a loaded machine does not count
        elapsed = float(re.search(r"launch failed after ([0-9.]+)s", err).group(1))
        assert elapsed < timeout_s + 10, f"rank {rank} took {elapsed:.1f}s for a {timeout_s}s timeout"
    assert f"MASTER_PORT={bad}" in results[1][2]


# ---------------------------------------------------------------------------------------------------- rank bodies


def _fabric(**kw) -> SimpleFabric:
    return SimpleFabric(settings(timeout_s=float(os.environ["FABRIC_TIMEOUT_S"]), **kw)).launch()


class Odd(nn.Module):
    """Odd-sized parameters so chunk boundaries fall inside them; some never get a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 5))
        self.b = nn.Parameter(torch.zeros(7))
        self.c = nn.Parameter(torch.zeros(1))
        self.d = nn.Parameter(torch.zeros(11, 13))
        self.e = nn.Parameter(torch.zeros(2, 3, 5))
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.unused = nn.Parameter(torch.zeros(6))  # no gradient on any rank
        self.f = nn.Parameter(torch.zeros(9))  # a gradient on some ranks only


def _local_grads(model: Odd, rank: int) -> dict[str, torch.Tensor | None]:
    """Integer multiples of 1/4: sums are exact, so the reduction must match bit for bit."""
    g = torch.Generator().manual_seed(100 + rank)
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "unused" or (name == "f" and rank % 2 == 1):
            out[name] = None
        else:
            out[name] = torch.randint(-400, 400, p.shape, generator=g).float() / 4
    return out


def _scenario_collectives() -> None:
    import torch.distributed as dist

    fabric = _fabric()
    rank, world = fabric.rank, fabric.world_size
    assert fabric.strategy == "simple-ddp" and dist.get_world_size() == world

    model = Odd()
    local = _local_grads(model, rank)
    expected = {}
    for name, g in local.items():
        ref = torch.zeros_like(getattr(model, name)) if g is None else g.clone()
        dist.all_reduce(ref)
        expected[name] = ref / world
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # chunks of 1 and 7 elements, boundaries inside every parameter, exactly all grads, larger than all grads
    for elements in [1, 7, 16, 50, total, total + 8, 10_000]:
        f = _fabric(chunk_mb=elements * 4 / 2**20)
        assert f.chunk_elements == elements
        for name, p in model.named_parameters():
            p.grad = None if local[name] is None else local[name].clone()
        f.all_reduce_gradients(model)
        for name, p in model.named_parameters():
            if name in ("unused", "frozen"):
                assert p.grad is None, (elements, name)
            else:
                assert torch.equal(p.grad, expected[name]), (elements, name)

    # the stream is reused across steps and picks up new gradients
    f = _fabric(chunk_mb=13 * 4 / 2**20)
    for step in range(3):
        for name, p in model.named_parameters():
            p.grad = None if local[name] is None else local[name] * (step + 1)
        f.all_reduce_gradients(model)
        assert torch.equal(model.d.grad, expected["d"] * (step + 1))

    # bf16 gradients (bf16-true) are reduced in fp32 and written back in bf16
    mlp = nn.Linear(5, 3).to(torch.bfloat16)
    grad = (torch.arange(15, dtype=torch.float32).reshape(3, 5) * (rank + 1)).to(torch.bfloat16)
    mlp.weight.grad, mlp.bias.grad = grad.clone(), None
    fabric.all_reduce_gradients(mlp)
    want = torch.arange(15, dtype=torch.float32).reshape(3, 5) * sum(range(1, world + 1)) / world
    assert mlp.weight.grad.dtype == torch.bfloat16 and torch.equal(mlp.weight.grad, want.to(torch.bfloat16))
    assert mlp.bias.grad is None

    # setup_model makes every rank start from rank 0's weights
    torch.manual_seed(rank)
    net = fabric.setup_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)))
    weights = net[0].weight.detach().clone()
    dist.broadcast(weights, src=0)
    assert torch.equal(net[0].weight, weights)

    # simple-ddp with accumulation == torch-ddp with no_sync == one process on the global batch
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    data = torch.randn(world * 2, 2, 4)  # [micro-batches, batch, features]; rank r owns rows 2r, 2r+1

    def run(fab: SimpleFabric, net: nn.Module, micro: torch.Tensor, normalizer: float) -> None:
        for i, x in enumerate(micro):
            with fab.no_sync(net, enabled=i < len(micro) - 1), fab.autocast():
                (net(x).square().sum() / normalizer).backward()
        fab.all_reduce_gradients(net)

    mine = data[2 * rank : 2 * rank + 2]
    simple = fabric.setup_model(_copy(base))
    run(fabric, simple, mine, fabric.loss_normalizer(mine.shape[0] * mine.shape[1]))
    ddp_fabric = _fabric(strategy="torch-ddp")
    ddp = ddp_fabric.setup_model(_copy(base))
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and ddp_fabric.unwrap(ddp).__class__ is nn.Sequential
    run(ddp_fabric, ddp, mine, ddp_fabric.loss_normalizer(mine.shape[0] * mine.shape[1]))
    single = _copy(base)
    (single(data.reshape(-1, 4)).square().sum() / data[..., 0].numel()).backward()
    for a, b, c in zip(simple.parameters(), ddp_fabric.unwrap(ddp).parameters(), single.parameters()):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.grad, c.grad, rtol=1e-6, atol=1e-7)

    # metrics and control
    t = torch.tensor([float(rank), 1.0])
    assert fabric.all_reduce(t.clone(), op="sum").tolist() == [sum(range(world)), world]
    assert fabric.all_reduce(t.clone(), op="mean").tolist() == [sum(range(world)) / world, 1.0]
    assert fabric.all_reduce(t.clone(), op="max").tolist() == [world - 1, 1.0]
    assert fabric.all_reduce(rank, op="min") == 0.0
    assert fabric.any_rank(rank == world - 1) is True  # one rank asking to stop stops all
    assert fabric.any_rank(False) is False
    assert fabric.broadcast_object({"step": 7, "rank": rank}) == {"step": 7, "rank": 0}
    fabric.barrier()

    # ranks that built different models are refused, not silently mixed
    other = nn.Linear(3, 2 + rank)
    other(torch.ones(1, 3)).sum().backward()
    try:
        fabric.all_reduce_gradients(other)
    except FabricError as err:
        assert "different parameter layout" in str(err)
    else:
        raise AssertionError("a layout mismatch went unnoticed")
    print("collectives ok", flush=True)
    fabric.teardown()


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _scenario_lost_rank(how: str) -> None:
    fabric = _fabric(chunk_mb=1000 * 4 / 2**20)  # several chunks in flight per reduction
    model = nn.Linear(64, 64)
    model(torch.randn(2, 64)).sum().backward()
    fabric.all_reduce_gradients(model)  # one good step: the failure must be caught inside the gradient stream
    if fabric.rank == fabric.world_size - 1:
        print("started", flush=True)
        if how == "die":
            os._exit(3)
        time.sleep(600)
    for _ in range(1000):
        model(torch.randn(2, 64)).sum().backward()
        fabric.all_reduce_gradients(model)
        fabric.barrier()
        time.sleep(0.01)
    raise AssertionError("the collectives kept succeeding without the lost rank")


if __name__ == "__main__":
    scenario = sys.argv[1]
    if scenario == "collectives":
        _scenario_collectives()
    elif scenario in ("die", "stall"):
        _scenario_lost_rank(scenario)
    elif scenario == "startup":
        t0 = time.monotonic()
        try:
            _fabric()
        except FabricError:
            print(f"launch failed after {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            raise
        raise AssertionError("the start-up should have failed")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
