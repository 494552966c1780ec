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


def test_a_resumed_run_trains_with_its_new_learning_rate_and_weight_decay(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=4", "optim.lr=3e-3")) == 0
    assert {g["initial_lr"] for g in _optimizer_groups(run)} == {3e-3}
    # The usual cure for a divergence: resume with a lower learning rate (and here a new weight decay).
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=8", "optim.lr=1e-4", "optim.weight_decay=0.05")
    assert train_module.main(args) == 0
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
