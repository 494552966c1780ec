"""recpre.xla on a real XLA device (XLA on CPU here, PJRT_DEVICE=CPU): graph counts and parity with eager.

Runs in the XLA virtual environment (scripts/make_xla_env.sh, then
`PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/xla -q`); skips elsewhere with the reason.
A small recurrent stand-in (prelude, a looped core that reads its step index, a head) stands for the model.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.xla

if importlib.util.find_spec("torch_xla") is None:
    pytest.skip(
        "torch_xla is not installed: run in the XLA env (bash scripts/make_xla_env.sh; PJRT_DEVICE=CPU "
        ".venv-xla/bin/python -m pytest tests/xla)",
        allow_module_level=True,
    )
os.environ.setdefault("PJRT_DEVICE", "CPU")

from recpre import xla  # noqa: E402

MAX_GRAPHS = 4  # prelude, one no-grad iteration, first step (creates optimizer state), steady step


class StandIn(nn.Module):
    """prelude -> n no-grad + k grad core iterations (reading the step index) -> head -> mean square loss."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.pre = nn.Linear(width, width)
        self.core = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, n: int, k: int, step_index: str = "tensor") -> torch.Tensor:
        e = self.pre(x)

        def step(s, i):
            return torch.tanh(self.core(torch.cat([s, e], -1))) + 0.01 * i

        s = xla.run_recurrence(step, torch.zeros_like(e), n, k, step_index=step_index)
        return self.head(s).pow(2).mean()


def _train(device, depths, *, k=2, step_index="tensor", nan_at=None, seed=0):
    """Train the stand-in on `device`; returns (losses, grad norms, compile counts after each step, model)."""
    torch.manual_seed(seed)
    model = StandIn().to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    data = torch.Generator().manual_seed(seed + 1)
    losses, norms, counts = [], [], []
    on_xla = xla.is_xla(torch.device(device))
    for i, n in enumerate(depths):
        x = torch.randn(4, 16, generator=data).to(device)
        loss = model(x, n, k, step_index=step_index)
        loss.backward()
        if nan_at == i:
            for p in params:
                p.grad.mul_(float("nan"))
        norm = xla.masked_optimizer_step(opt, params, 1.0)
        opt.zero_grad(set_to_none=True)
        if on_xla:
            xla.sync()
            counts.append(xla.compile_count())
        # read after the step's graph is cut, as the driver does: a copy of computed values, not a compile
        losses.append(float(loss.detach()))
        norms.append(float(norm))
    return losses, norms, counts, model


def _depths(count=20, seed=3):
    rng = np.random.default_rng(seed)
    depths = [int(v) for v in rng.integers(0, 9, size=count)]
    depths[:3] = [0, 5, 1]  # n = 0, a long draw and a short one early: every graph appears in the first steps
    return depths


def test_compile_count_is_constant_whatever_the_sampled_depth():
    depths = _depths()
    assert len(set(depths)) >= 6
    _, _, counts, _ = _train(xla.device(), depths)
    print("compile counts per step:", counts)
    assert counts[-1] <= MAX_GRAPHS, counts
    assert counts[2:] == [counts[2]] * (len(counts) - 2), f"graphs kept compiling after step 2: {counts}"


def test_python_int_step_index_would_compile_per_depth():
    """The control: the same loop with the index as a Python int compiles a new graph for new depths."""
    _, _, counts, _ = _train(xla.device(), [1, 3, 5, 7], step_index="int")
    assert counts[-1] > MAX_GRAPHS + 2, counts


def test_losses_match_cpu_eager_in_fp32():
    depths = _depths(count=12, seed=5)
    cpu_losses, cpu_norms, _, cpu_model = _train("cpu", depths)
    xla_losses, xla_norms, _, xla_model = _train(xla.device(), depths)
    np.testing.assert_allclose(xla_losses, cpu_losses, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(xla_norms, cpu_norms, rtol=1e-4, atol=1e-6)
    for a, b in zip(cpu_model.parameters(), xla_model.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5)


def test_non_finite_step_is_skipped_on_device_without_new_graphs():
    depths = [2, 2, 3, 2, 4, 2]
    clean_losses, _, clean_counts, _ = _train(xla.device(), depths[:3])
    losses, norms, counts, _ = _train(xla.device(), depths, nan_at=3)
    assert not np.isfinite(norms[3]) and np.isfinite(norms[4])
    assert losses[:3] == pytest.approx(clean_losses)
    # The poisoned step multiplies the gradients once more: that is one graph of the test's own, no more.
    assert counts[-1] <= counts[2] + 1, counts


def test_to_cpu_moves_xla_state():
    dev = xla.device()
    model = StandIn().to(dev)
    state = xla.to_cpu({"model": model.state_dict(), "step": 3})
    assert all(t.device.type == "cpu" for t in state["model"].values()) and state["step"] == 3
