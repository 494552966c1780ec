"""NaN / Inf in the loss or the gradients, and loss spikes, injected into a real tiny training run.

The model train.py builds gets a forward hook that, on chosen optimizer steps, turns the loss into NaN or Inf,
scales it (a spike), or makes the gradient flowing back from a finite loss infinite. A non-finite step is
skipped (weights unchanged) and counted; a persistent one stops the run with a message and a last good
checkpoint; the loss-spike guardrail stops only after train.loss_spike_patience spiking steps.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args

from recpre.checkpoint import find_latest, list_checkpoints, load_state, verify_checkpoint
from recpre.monitor import read_metrics

ACCUM = 2  # world batch 4 / micro-batch 2 on one rank


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def moments(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer state (moments and step counters), by parameter index and name."""
    state = load_state(folder)["optimizer"]["state"]
    return {f"{i}.{name}": value for i, s in state.items() for name, value in s.items()}


def rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == name]


def inject(monkeypatch, train_module, kind: str, bad_steps) -> None:
    """Make train.py's model misbehave on the optimizer steps in `bad_steps` (1-based, as in metrics.jsonl)."""
    real_build = train_module.build_model

    def build_model(config, *args, **kwargs):
        model = real_build(config, *args, **kwargs)
        calls = {"train": 0}

        def hook(module, inputs, output):
            if not module.training or output.loss is None:
                return output
            step = calls["train"] // ACCUM + 1
            calls["train"] += 1
            if step not in bad_steps:
                return output
            loss = output.loss
            if kind == "nan-loss":
                loss = loss * float("nan")
            elif kind == "inf-loss":
                loss = loss * float("inf")
            elif kind == "inf-grad":  # the loss stays finite; the gradient it sends back does not
                loss.register_hook(lambda g: g * float("inf"))
            elif kind == "spike":
                loss = loss * 30.0
            return dataclasses.replace(output, loss=loss)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build_model)


@pytest.mark.parametrize("kind", ["nan-loss", "inf-loss", "inf-grad"])
def test_a_nonfinite_step_is_skipped_and_counted(kind, train_module, tiny_corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    inject(monkeypatch, train_module, kind, {3})
    extra = ["train.max_steps=5", "checkpoint.interval=1", "checkpoint.keep=10", "eval.interval=0"]
    capsys.readouterr()
    assert train_module.main(tiny_run_args(run, tiny_corpus, *extra, "log.progress=lines")) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 1 and "skipped_steps 1," in summary[0], summary

    skipped = events(run, "skipped_step")
    assert [s["step"] for s in skipped] == [3] and skipped[0]["skipped_steps"] == 1
    assert events(run, "finished")[0]["skipped_steps"] == 1
    by_step = rows(run)
    assert by_step[3]["grad_norm"] is None  # non-finite, written as null
    assert all(by_step[s]["grad_norm"] is not None and math.isfinite(by_step[s]["loss"]) for s in (1, 2, 4, 5))
    if kind == "inf-grad":
        assert math.isfinite(by_step[3]["loss"])
    else:
        assert by_step[3]["loss"] is None
    root = run / "checkpoints"
    assert same(weights(root / "step-00000002"), weights(root / "step-00000003")), "step 3 must not change weights"
    assert not same(weights(root / "step-00000003"), weights(root / "step-00000004")), "training goes on"
    before, after = moments(root / "step-00000002"), moments(root / "step-00000003")
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before), "step 3 must not change the optimizer state"
    assert not same(after, moments(root / "step-00000004")), "the next good step updates it"
    for folder in list_checkpoints(root):
        assert all(torch.isfinite(t).all() for t in weights(folder).values()), folder


def test_persistent_nonfinite_steps_stop_the_run_with_a_last_good_checkpoint(
    train_module, tiny_corpus, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    inject(monkeypatch, train_module, "nan-loss", set(range(3, 100)))
    args = tiny_run_args(
        run,
        tiny_corpus,
        "train.max_steps=8",
        "train.max_nonfinite_steps=3",
        "checkpoint.interval=2",
        "checkpoint.keep=5",
        "eval.interval=0",
    )
    capsys.readouterr()
    assert train_module.main(args) == 1
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row had non-finite gradients (train.max_nonfinite_steps=3)" in err, err
    assert "step-00000005" in err and err.strip().startswith("error: ")
    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000004", "step-00000005"]
    last = find_latest(root)
    assert last.name == "step-00000005"
    verify_checkpoint(last)
    good = weights(root / "step-00000002")  # the last weights an optimizer step produced
    assert same(weights(last), good) and same(weights(root / "step-00000004"), good)
    assert not events(run, "finished")
    assert [s["step"] for s in events(run, "skipped_step")] == [3, 4, 5]

    # the fault gone (data fixed, lr lowered), the same command continues from the saved checkpoint
    monkeypatch.undo()
    assert train_module.main(args) == 0
    assert events(run, "finished")[0]["skipped_steps"] == 3
    assert all(math.isfinite(r["loss"]) for s, r in rows(run).items() if s > 5)


SPIKE_ARGS = [
    "train.max_steps=30",
    "schedule.cooldown_steps=0",
    "train.loss_spike_factor=3",
    "train.loss_spike_patience=3",
    "checkpoint.interval=5",
    "checkpoint.keep=10",
    "eval.interval=0",
]


def test_a_persistent_loss_spike_stops_the_run_after_patience_steps(
    train_module, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """Spiking from step 24 (after the guard's 20-step warm-up): steps 24, 25, 26 spike, the run stops at 26."""
    run = tmp_path / "run"
    inject(monkeypatch, train_module, "spike", set(range(24, 100)))
    capsys.readouterr()
    assert train_module.main(tiny_run_args(run, tiny_corpus, *SPIKE_ARGS)) == 1
    err = capsys.readouterr().err
    assert "train.loss_spike_factor=3.0" in err and "for 3 steps" in err and "at step 26" in err, err
    assert max(rows(run)) == 26 and not events(run, "finished")
    # nothing saved while the loss was spiking: `latest` holds pre-spike weights, as the message promises
    latest = find_latest(run / "checkpoints")
    assert latest.name == "step-00000020", [p.name for p in list_checkpoints(run / "checkpoints")]


def test_a_short_spike_or_a_disabled_guard_does_not_stop_the_run(train_module, tiny_corpus, tmp_path, monkeypatch):
    short = tmp_path / "short"
    inject(monkeypatch, train_module, "spike", {24, 25})  # 2 spiking steps < patience 3
    assert train_module.main(tiny_run_args(short, tiny_corpus, *SPIKE_ARGS)) == 0
    assert events(short, "finished") and rows(short)[24]["loss"] > 3 * rows(short)[23]["loss"]
    assert find_latest(short / "checkpoints").name == "step-00000030"

    off = tmp_path / "off"
    inject(monkeypatch, train_module, "spike", set(range(24, 100)))
    assert train_module.main(tiny_run_args(off, tiny_corpus, *SPIKE_ARGS, "train.loss_spike_factor=null")) == 0
    assert events(off, "finished") and max(rows(off)) == 30
