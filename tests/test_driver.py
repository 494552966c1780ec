"""The driver as components: train_step called directly, state that saves itself, old checkpoints resuming,
init_from across runtime choices, and a depth curriculum that resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import signal_after_step, tiny_run_args

from recpre.checkpoint import load_state
from recpre.config import ModelConfig
from recpre.fabric import SimpleFabric
from recpre.guardrails import LossSpikeGuard
from recpre.model import build_model
from recpre.monitor import read_metrics
from recpre.optim import build_optimizer
from recpre.recurrence import RecurrencePolicy
from recpre.settings import load_settings
from recpre.step_backends import EagerStep
from recpre.train_state import TrainState, upgrade_legacy_state
from recpre.train_step import Trainer, train_step

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-main-v1"


def one_process() -> SimpleFabric:
    """A real single-process fabric on the CPU (no process group), as train.py builds it."""
    return SimpleFabric(load_settings(None, ["fabric.device=cpu", "fabric.strategy=single"]).fabric, env={})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_train_step_is_one_optimizer_step_with_its_metrics():
    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent", n_embd=32, n_heads=2, intermediate_size=64, block_size=16)
    model = build_model(config)
    optimizer = build_optimizer(model, load_settings(None, []).optim)
    recurrence = RecurrencePolicy(mean=4, backprop_depth=2, sampling="poisson-lognormal-filling", lockstep=True)
    trainer = Trainer(model, optimizer, one_process(), EagerStep(), config, recurrence, seed=3, grad_clip=1.0)
    state = TrainState(guard=LossSpikeGuard(None, 1))
    gen = torch.Generator().manual_seed(1)
    micro = [(torch.randint(0, 4000, (2, 16), generator=gen),) * 2 for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(trainer, state, micro)
    assert (state.step, state.tokens, state.micro_batches, state.skipped_steps) == (1, 3 * 2 * 16, 3, 0)
    assert metrics["accum"] == 3 and metrics["depth"] == list(recurrence.depth(0, 0, 3)) and metrics["flops"] > 0
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the optimizer stepped
    assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next step
    # The same step again from the same weights, state and batches gives the same loss: depth and noise are
    # functions of (seed, step, global micro-batch), not of a hidden RNG position.
    torch.manual_seed(123)
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)
    optimizer2 = build_optimizer(model, load_settings(None, []).optim)
    trainer2 = Trainer(model, optimizer2, one_process(), EagerStep(), config, recurrence, seed=3, grad_clip=1.0)
    again = train_step(trainer2, TrainState(guard=LossSpikeGuard(None, 1)), micro)
    assert again["loss"] == metrics["loss"]


def test_legacy_state_upgrades_to_the_component_format():
    state = load_state(FIXTURE / "checkpoints" / "step-00000004")
    assert "micro_steps" in state["progress"]  # the fixture really is the old format
    new = upgrade_legacy_state(state)["progress"]
    ts = TrainState(guard=LossSpikeGuard(4.0, 20))
    ts.load_state_dict(new)
    assert (ts.step, ts.tokens, ts.micro_batches) == (4, 16384, 16)
    assert ts.guard.state_dict() == state["guard"]


def fixture_args(run: Path, *extra: str) -> list[str]:
    return [
        f"run.out_dir={run}",
        "model.overrides.n_embd=16",
        "model.overrides.n_heads=2",
        "checkpoint.interval=2",
        "checkpoint.keep=1",
        "eval.interval=0",
        "log.plot=false",
        "log.progress=none",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=1",
        "log.interval=1",
        *extra,
    ]


@pytest.mark.slow
def test_a_checkpoint_written_by_the_previous_driver_resumes(train_module, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    shutil.copy(FIXTURE / "metrics.jsonl", run / "metrics.jsonl")
    saved = load_state(run / "checkpoints" / "step-00000004")["optimizer"]
    assert train_module.main(fixture_args(run, "train.max_steps=5", "checkpoint.interval=0")) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in rows if "loss" in r][-1] == 5 * 16 * 256
    new = load_state(run / "checkpoints" / "step-00000005")
    assert new["progress"]["micro_batches"] == 20 and new["progress"]["guard"]["seen"] == 5
    # the optimizer's step counters went on from the old moments (4 steps) instead of starting over
    steps = {int(s["step"]) for s in new["optimizer"]["state"].values()}
    assert steps == {int(s["step"]) + 1 for s in saved["state"].values()} == {5}


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [
        ["train.recurrence.mean=8"],
        ["model.attention=eager"],
        ["model.overrides.mean_recurrence=5", "model.overrides.mean_backprop_depth=2"],
    ],
)
def test_init_from_accepts_a_checkpoint_that_differs_only_in_runtime_choices(
    train_module, tiny_corpus, tmp_path, change
):
    base = tmp_path / "base"
    assert train_module.main(tiny_run_args(base, tiny_corpus, "train.max_steps=4", "eval.interval=0")) == 0
    tuned = tmp_path / "tuned"
    args = tiny_run_args(tuned, tiny_corpus, "train.max_steps=4", "eval.interval=0", f"run.init_from={base}", *change)
    assert train_module.main(args) == 0
    assert sorted(losses(tuned)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_run_interrupted_mid_curriculum_resumes_to_the_same_losses(train_module, tiny_corpus, tmp_path, monkeypatch):
    curriculum = [
        "train.max_steps=8",
        "train.recurrence.mean=6",
        "train.recurrence.backprop_depth=3",
        "train.recurrence.curriculum.name=sqrt",
        "train.recurrence.curriculum.steps=6",
        "train.recurrence.curriculum.start_mean=1",
        "train.recurrence.curriculum.start_backprop_depth=1",
        "checkpoint.interval=0",
    ]
    ref, split = tmp_path / "ref", tmp_path / "split"
    assert train_module.main(tiny_run_args(ref, tiny_corpus, *curriculum)) == 0
    with signal_after_step(3):
        assert train_module.main(tiny_run_args(split, tiny_corpus, *curriculum)) == 0
    assert sorted(losses(split)) == [1, 2, 3]
    assert train_module.main(tiny_run_args(split, tiny_corpus, *curriculum)) == 0
    assert losses(split) == losses(ref)
    depths = [r["depth"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]
    assert depths[0][1] == 1 and depths[-1][1] == 3  # the backprop depth ramped from 1 to 3


@pytest.mark.slow
def test_the_summary_reports_the_whole_runs_validation_after_a_stop_and_a_resume(
    train_module, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """The summary's validation figures come from the whole run's metrics: a segment stopped between
    validations reports the last one (with its step), not the step-0 value, and a resumed segment reports the
    run's first validation as initial_val_loss, not its own."""
    run = tmp_path / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=6", "eval.interval=2", "checkpoint.interval=0")
    args.append("log.progress=lines")
    with signal_after_step(3):
        capsys.readouterr()
        assert train_module.main(args) == 0
    vals = {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert sorted(vals) == [0, 2]
    stopped = read_metrics(run / "metrics.jsonl")
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("summary: ")][0]
    assert f"final_val_loss {round(vals[2], 4)}," in summary and "final_val_step 2" in summary, summary
    assert f"initial_val_loss {round(vals[0], 4)}," in summary, summary
    assert stopped[-1]["event"] == "stopped"

    assert train_module.main(args) == 0  # the resumed segment: validations at 4 and 6 only
    rows = read_metrics(run / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    finished = rows[-1]
    assert finished["event"] == "finished" and finished["initial_val_loss"] == round(vals[0], 4)
    assert finished["final_val_loss"] == round(vals[6], 4) and finished["final_val_step"] == 6
