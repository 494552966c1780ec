"""Resuming with changed settings: new hyperparameters take effect, incompatible changes are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_args

from recpre.checkpoint import find_latest, load_state
from recpre.errors import UserError


def _optimizer_groups(run_dir) -> list[dict]:
    state = load_state(find_latest(run_dir / "checkpoints"))
    return state["optimizer"]["param_groups"]


def _moments_at_first_step(monkeypatch) -> list[dict]:
    """Copies of the optimizer state that the first optimizer step of the run starts from."""
    seen: list[dict] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not seen:
            seen.append({i: {k: v.clone() for k, v in s.items()} for i, s in self.state_dict()["state"].items()})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_a_resumed_run_trains_with_its_new_learning_rate_and_weight_decay(
    train_module, tiny_corpus, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    assert train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=4", "optim.lr=3e-3")) == 0
    assert {g["initial_lr"] for g in _optimizer_groups(run)} == {3e-3}
    saved = load_state(find_latest(run / "checkpoints"))["optimizer"]["state"]
    # The usual cure for a divergence: resume with a lower learning rate (and here a new weight decay).
    first = _moments_at_first_step(monkeypatch)
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=8", "optim.lr=1e-4", "optim.weight_decay=0.05")
    assert train_module.main(args) == 0
    # the resumed run's first step starts from the saved moments, not from fresh ones
    assert first and first[0].keys() == saved.keys() and len(saved) > 0
    for index, moments in saved.items():
        assert moments.keys() == first[0][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in moments.items():
            assert torch.equal(first[0][index][name], value), (index, name)
    ended = load_state(find_latest(run / "checkpoints"))["optimizer"]["state"]
    assert all(float(s["step"]) == 8 for s in ended.values())
    groups = _optimizer_groups(run)
    assert {g["initial_lr"] for g in groups} == {1e-4}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert max(g["lr"] for g in groups) <= 1e-4


def test_resuming_with_another_optimizer_is_refused_with_a_clear_message(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=4")) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UserError) as err:  # run_cli turns it into one line on stderr and exit code 2
        train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=6", "optim.name=ellis-adam"))
    assert "optimizer state" in str(err.value) and "run.init_from" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_optimizer_state_of_another_grouping_is_a_user_error():
    from recpre.optim import load_optimizer_state

    a = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1.0)
    b = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [torch.nn.Parameter(torch.ones(3))]}], lr=1.0
    )
    try:
        load_optimizer_state(b, a.state_dict(), source="ckpt")
    except UserError as err:
        assert "ckpt" in str(err)
    else:
        raise AssertionError("a mismatched optimizer state must be refused")
