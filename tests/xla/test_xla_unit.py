"""recpre.xla's pure pieces on plain CPU tensors: they run in the default suite, torch_xla or not.

The XLA-device behaviour (graph counts, parity with eager) is in test_xla_device.py / test_xla_train.py, which
run in the XLA virtual environment (scripts/make_xla_env.sh).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recpre import xla
from recpre.errors import UserError


def test_stable_depth_fixes_k_and_keeps_total_depth():
    assert xla.stable_depth(5, 2, 2) == (5, 2)
    assert xla.stable_depth(0, 1, 2) == (0, 2)  # r = 1 < k: raised to r = k
    assert xla.stable_depth(0, 0, 3) == (0, 3)
    for n in range(6):
        for k in range(4):
            n2, k2 = xla.stable_depth(n, k, 3)
            assert k2 == 3 and n2 + k2 == max(n + k, 3)
    with pytest.raises(ValueError):
        xla.stable_depth(-1, 2, 2)


def test_sweep_depth_visits_no_iteration_first_and_repeated_iteration():
    depths = [xla.sweep_depth(i, 4) for i in range(xla.SWEEP_STEPS)]
    assert {n for n, _ in depths} == {0, 1, 2}
    assert {k for _, k in depths} == {4}


def test_gradient_buckets_respect_the_byte_limit_and_keep_order():
    tensors = [torch.zeros(n) for n in (10, 20, 5, 100, 1, 1)]  # fp32: 40, 80, 20, 400, 4, 4 bytes
    buckets = xla.gradient_buckets(tensors, bucket_bytes=120)
    assert [[t.numel() for t in b] for b in buckets] == [[10, 20], [5], [100], [1, 1]]
    assert [t for b in buckets for t in b] == tensors
    assert xla.gradient_buckets([], 10) == []


def test_accelerator_present_needs_torch_xla_and_a_device(monkeypatch):
    monkeypatch.setattr(xla, "available", lambda: False)
    assert not xla.accelerator_present({"PJRT_DEVICE": "NEURON"})
    monkeypatch.setattr(xla, "available", lambda: True)
    assert xla.accelerator_present({"PJRT_DEVICE": "NEURON"})
    assert xla.accelerator_present({"PJRT_DEVICE": "tpu"})
    assert not xla.accelerator_present({"PJRT_DEVICE": "CPU"})  # XLA on CPU is chosen explicitly, never auto


def test_require_names_the_install_when_torch_xla_is_missing():
    if xla.available():
        pytest.skip("torch_xla is installed here: the missing-module message cannot be observed")
    with pytest.raises(UserError, match="make_xla_env.sh"):
        xla.require()
    assert xla.compile_count() == 0


def test_cut_is_a_no_op_off_xla():
    t = torch.ones(3)
    xla.cut(t)
    assert not xla.is_xla(t) and not xla.is_xla(torch.device("cpu")) and not xla.is_xla(None)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _grads(model: nn.Module, scale: float = 1.0) -> None:
    torch.manual_seed(1)
    loss = model(torch.randn(5, 4)).pow(2).sum() * scale
    loss.backward()


@pytest.mark.parametrize("max_norm", [0.05, math.inf])
def test_masked_step_equals_clip_and_step_when_finite(max_norm):
    a, b = _tiny(), _tiny()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(3):
        _grads(a)
        _grads(b)
        want = torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm)
        opt_a.step()
        got = xla.masked_optimizer_step(opt_b, list(b.parameters()), max_norm)
        torch.testing.assert_close(got, want)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=0)
        opt_a.zero_grad()
        opt_b.zero_grad()


def test_masked_step_skips_a_non_finite_step_on_the_device():
    model = _tiny()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    # First step non-finite: the state it creates must come back as zeros (the moments' initial value).
    _grads(model, scale=float("nan"))
    before = [p.detach().clone() for p in params]
    norm = xla.masked_optimizer_step(opt, params, 1.0)
    assert not torch.isfinite(norm)
    for p, old in zip(params, before):
        assert torch.equal(p, old)
    for state in opt.state.values():
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    # On CPU the step count lives beside the parameters: the mask covers it, nothing is left to rewind.
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    xla.rewind_step_counters(opt, torch.device("cpu"))
    assert all(float(s["step"]) == 0 for s in opt.state.values())

    # A finite step, then an infinite one: parameters and moments stay at the finite step's values.
    opt.zero_grad()
    _grads(model)
    xla.masked_optimizer_step(opt, params, 1.0)
    after_good = [p.detach().clone() for p in params]
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    opt.zero_grad()
    _grads(model, scale=float("inf"))
    xla.masked_optimizer_step(opt, params, 1.0)
    for p, old in zip(params, after_good):
        assert torch.equal(p, old)
    for s, old in zip(opt.state.values(), moments):
        assert torch.equal(s["exp_avg"], old)


def test_rewind_step_counters_only_touches_counts_off_the_device():
    opt = torch.optim.AdamW(_tiny().parameters(), lr=1e-2)
    for i, p in enumerate(opt.param_groups[0]["params"]):
        opt.state[p]["step"] = torch.tensor(5.0) if i % 2 else torch.tensor(5.0, device="meta")
    xla.rewind_step_counters(opt, torch.device("meta"))
    steps = [opt.state[p]["step"] for p in opt.param_groups[0]["params"]]
    assert [float(s) for s in steps[1::2]] == [4.0] * len(steps[1::2])
    assert all(s.device.type == "meta" for s in steps[0::2])


def test_run_recurrence_matches_a_plain_loop_and_backpropagates_through_k_only():
    torch.manual_seed(0)
    core = nn.Linear(6, 6)
    s0 = torch.randn(2, 6)

    def step(s, i):
        return torch.tanh(core(s)) + 0.1 * i

    got = xla.run_recurrence(step, s0, 3, 2)
    want = s0
    for i in range(5):
        want = torch.tanh(core(want)) + 0.1 * i
    torch.testing.assert_close(got, want)
    got.sum().backward()
    grad_k2 = core.weight.grad.clone()
    core.zero_grad()
    s = s0
    with torch.no_grad():
        for i in range(3):
            s = step(s, i)
    for i in range(3, 5):
        s = step(s, i)
    s.sum().backward()
    torch.testing.assert_close(grad_k2, core.weight.grad)
    with pytest.raises(ValueError):
        xla.run_recurrence(step, s0, 1, 1, step_index="float")


def test_to_cpu_keeps_structure():
    state = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "x"}
    out = xla.to_cpu(state)
    assert out["b"] == "x" and isinstance(out["a"][1], tuple) and torch.equal(out["a"][0], torch.ones(2))
