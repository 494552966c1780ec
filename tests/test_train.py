"""train.py end to end on a tiny model and corpus: learning, exact resume, guardrails, budgets, bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import REPO, signal_after_step, tiny_run_args

from recpre.checkpoint import list_checkpoints, load_model
from recpre.errors import UserError
from recpre.monitor import Monitor, read_metrics
from recpre.settings import load_settings


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def events(run_dir, name) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == name]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_model(run_dir)[0].state_dict()


def test_training_reduces_loss_and_writes_the_run_folder(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=40", "eval.interval=20", "log.plot=true")
    assert train_module.main(args) == 0
    rows = read_metrics(run / "metrics.jsonl")
    vals = [r for r in rows if "val_loss" in r]
    assert [v["step"] for v in vals] == [0, 20, 40]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 1.0
    assert {"val_loss_1", "val_loss_2", "val_loss_3", "val_ppl"} <= set(vals[-1])
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_rows[0])
    assert rows[-1]["event"] == "finished" and rows[-1]["steps"] == 40
    assert (run / "settings.yaml").is_file() and (run / "loss.png").is_file()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000036", "step-00000040"]  # keep 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000040"


def test_resume_after_a_crash_reproduces_losses_and_weights(train_module, tiny_corpus, tmp_path, monkeypatch):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert train_module.main(tiny_run_args(ref, tiny_corpus)) == 0

    original = Monitor.train

    def crash_at_step_6(self, row, **kw):
        original(self, row, **kw)
        if row["step"] == 6:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Monitor, "train", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(tiny_run_args(crashed, tiny_corpus))
    monkeypatch.setattr(Monitor, "train", original)
    assert [p.name for p in list_checkpoints(crashed / "checkpoints")] == ["step-00000004"]
    assert train_module.main(tiny_run_args(crashed, tiny_corpus)) == 0  # run.resume=auto

    assert losses(crashed) == losses(ref)
    assert list(losses(ref)) == list(range(1, 9))
    a, b = weights(ref), weights(crashed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_signal_saves_at_the_step_boundary_and_resume_continues_exactly(
    train_module, tiny_corpus, tmp_path, monkeypatch
):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    extra = ["checkpoint.interval=0", "eval.interval=0"]
    assert train_module.main(tiny_run_args(ref, tiny_corpus, *extra)) == 0
    with signal_after_step(3):
        assert train_module.main(tiny_run_args(stopped, tiny_corpus, *extra)) == 0
    assert [p.name for p in list_checkpoints(stopped / "checkpoints")] == ["step-00000003"]
    assert events(stopped, "stopped")[0]["reason"] == "SIGUSR2" and not events(stopped, "finished")
    assert train_module.main(tiny_run_args(stopped, tiny_corpus, *extra)) == 0
    assert losses(stopped) == losses(ref)
    a, b = weights(ref), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_gradient_step_is_skipped_and_counted(train_module, tiny_corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("RECPRE_DEBUG_NAN_STEPS", "3")
    assert train_module.main(tiny_run_args(run, tiny_corpus, "checkpoint.interval=0", "eval.interval=0")) == 0
    skipped = events(run, "skipped_step")
    assert [s["step"] for s in skipped] == [3] and skipped[0]["skipped_steps"] == 1
    assert events(run, "finished")[0]["skipped_steps"] == 1
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert rows[3]["grad_norm"] is None  # NaN, written as null
    assert all(rows[s]["grad_norm"] is not None for s in rows if s != 3)


def test_too_many_nonfinite_steps_abort_after_saving(train_module, tiny_corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setenv("RECPRE_DEBUG_NAN_STEPS", "2,3,4")
    args = tiny_run_args(run, tiny_corpus, "train.max_nonfinite_steps=3", "checkpoint.interval=0", "eval.interval=0")
    assert train_module.main(args) == 1
    assert "3 optimizer steps in a row had non-finite gradients" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004"]
    assert not events(run, "finished")


def test_max_tokens_is_exact_with_a_batch_ramp(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    unit = 2 * 32  # micro-batch x block size on one rank
    budget = 23 * unit  # ramp 1, 1, 2, 3 micro-batches ... then 4 per step; the last step is shortened
    args = tiny_run_args(
        run,
        tiny_corpus,
        "train.max_steps=null",
        f"train.max_tokens={budget}",
        "train.world_batch_size=8",
        "schedule.batch_size_ramp=4",
        "schedule.ramp_start_batch_size=2",
        "eval.interval=0",
    )
    assert train_module.main(args) == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["accum"] for r in rows] == [1, 1, 2, 3, 4, 4, 4, 4]
    assert rows[-1]["tokens"] == budget == events(run, "finished")[0]["tokens"]
    assert [r["tokens"] for r in rows] == [unit * sum([1, 1, 2, 3, 4, 4, 4, 4][: i + 1]) for i in range(8)]


def test_saved_settings_reload_equal(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "eval.interval=0")
    assert train_module.main(args) == 0
    original = load_settings(None, args)
    for path in (run / "settings.yaml", run / "checkpoints" / "step-00000004" / "settings.yaml"):
        assert dataclasses.asdict(load_settings(path, [])) == dataclasses.asdict(original)


def test_a_checkpoint_of_another_shape_is_refused(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=4", "eval.interval=0")) == 0
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(UserError, match=r"different model shape \(n_embd 32 \(checkpoint\) vs 64"):
        train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=6", "model.overrides.n_embd=64"))
    assert sorted(p.name for p in run.rglob("*")) == before
    # the same refusal for weights-only starts
    other = tmp_path / "other"
    with pytest.raises(UserError, match="different model shape"):
        train_module.main(tiny_run_args(other, tiny_corpus, f"run.init_from={run}", "model.overrides.n_embd=64"))
    assert not other.exists()


def test_init_from_loads_weights_only(train_module, tiny_corpus, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert train_module.main(tiny_run_args(src, tiny_corpus, "train.max_steps=4")) == 0
    args = tiny_run_args(dst, tiny_corpus, f"run.init_from={src}", "train.max_steps=4")
    assert train_module.main(args) == 0
    assert list(losses(dst)) == [1, 2, 3, 4]  # a fresh run (step counter from 0), not a resume
    src_val = {r["step"]: r["val_loss"] for r in read_metrics(src / "metrics.jsonl") if "val_loss" in r}
    dst_val = {r["step"]: r["val_loss"] for r in read_metrics(dst / "metrics.jsonl") if "val_loss" in r}
    assert dst_val[0] == src_val[4]  # validation before any step sees the weights src ended with


def test_bad_input_exits_2_and_writes_nothing(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    for bad in (["train.max_stepz=3"], ["model.overrides.n_embd=33"], ["optim.name=sgd"]):
        proc = subprocess.run(
            [sys.executable, "train.py", *tiny_run_args(run, tiny_corpus), *bad],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert not run.exists()


def test_subprocess_run_prints_lines_and_finishes(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "log.progress=auto", "eval.interval=4")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 4/4 | loss" in proc.stdout and "validation step 4" in proc.stdout  # not a TTY: plain lines
    assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "finished"


def test_print_config_and_help(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--print-config", f"run.out_dir={tmp_path / 'x'}", "train.max_steps=500"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 500" in proc.stdout and not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--print-config" in proc.stdout


def test_loss_spike_guard_needs_patience_and_ignores_the_spikes_in_its_mean():
    from recpre.guardrails import LossSpikeGuard

    guard = LossSpikeGuard(factor=2.0, patience=3, warmup=5)
    assert not any(guard.update(5.0 - 0.1 * i) for i in range(10))
    mean = guard.mean
    assert not guard.update(100.0) and not guard.update(100.0)
    assert guard.mean == mean  # spikes do not drag the reference up
    assert not guard.update(4.0)  # one normal step resets the count
    assert [guard.update(100.0) for _ in range(3)] == [False, False, True]
    restored = LossSpikeGuard(factor=2.0, patience=3, warmup=5)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert not LossSpikeGuard(None, 1).update(1e9)


def test_learning_rate_reaches_every_group_in_proportion():
    from recpre.schedules import set_learning_rate

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.02}], lr=1.0)
    set_learning_rate(opt, 0.5, base_lr=1.0)
    set_learning_rate(opt, 0.25, base_lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.005]
