"""Monitor: metrics.jsonl rows, console lines, resume truncation, the loss plot, FLOPs and MFU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from recpre.config import ModelConfig
from recpre.flops import PEAKS, device_peak, mfu, training_flops_per_token
from recpre.monitor import Monitor, Throughput, plot_losses, read_metrics, truncate_metrics


def log_settings(progress: str = "lines") -> SimpleNamespace:
    return SimpleNamespace(progress=progress, wandb=SimpleNamespace(mode="disabled", project="p", entity=None))


def train_row(step: int, loss: float = 3.0) -> dict:
    return {"step": step, "tokens": 64 * step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0}


def test_rows_lines_and_final_event(tmp_path, capsys):
    mon = Monitor(tmp_path, log_settings=log_settings(), total_steps=3)
    mon.validation({"step": 0, "tokens": 0, "val_loss": 8.0, "val_ppl": 2981.0, "val_loss_1": 8.1, "val_loss_4": 8.0})
    for s in range(1, 4):
        mon.train(train_row(s, loss=float("nan") if s == 2 else 3.0))
    mon.event("finished", steps=3)
    mon.close({"steps": 3}, plot=True)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["val_loss_4"] == 8.0
    assert [r["step"] for r in rows[1:4]] == [1, 2, 3]
    assert rows[2]["loss"] is None  # NaN is written as null: every line stays valid JSON
    assert rows[-1] == {"event": "finished", "steps": 3}
    out = capsys.readouterr().out
    assert "step 1/3 | loss 3.0000" in out and "val_loss 8.0000" in out and "summary: steps 3" in out
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_disabled_monitor_writes_and_prints_nothing(tmp_path, capsys):
    mon = Monitor(tmp_path, log_settings=log_settings(), total_steps=3, enabled=False)
    mon.train(train_row(1))
    mon.event("finished")
    mon.close({"a": 1})
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [train_row(s) for s in range(1, 6)] + [{"event": "finished"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    mon = Monitor(tmp_path, log_settings=log_settings("none"), total_steps=5, start_step=3)
    mon.train(train_row(4))
    mon.close(plot=False)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_plot_without_rows_writes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_throughput_counts_only_timed_windows(monkeypatch):
    """Time between stop() and the next start() (validation, checkpoints) and tokens of untimed work do not count."""
    clock = iter([10.0, 12.0, 20.0, 21.0])
    monkeypatch.setattr("recpre.monitor.time.perf_counter", lambda: next(clock))
    t = Throughput()
    t.start()  # 10
    t.stop(1000)  # 12: 2 s
    t.stop(700)  # not started: untimed, not counted
    t.start()  # 20 (8 s of validation before it)
    t.stop(500)  # 21: 1 s
    assert t.rate() == (1500 / 3, 3.0)
    assert t.rate() == (0.0, 0.0)  # a new window


def test_flops_at_depth_and_mfu():
    cfg = ModelConfig.from_name("debug-recurrent")
    shallow, deep = training_flops_per_token(cfg, 0, 2), training_flops_per_token(cfg, 6, 2)
    assert deep > shallow
    # a no-grad iteration costs a forward only, a third of a trained one: 6 no-grad = 2 more trained
    assert deep - shallow == pytest.approx(training_flops_per_token(cfg, 0, 4) - shallow)
    assert device_peak("cpu") == ("cpu", None)
    assert mfu(1e12, None) == (None, None)
    datasheet, measured = mfu(0.5 * 798e12, PEAKS["h100"], world_size=1)
    assert measured == pytest.approx(0.5) and datasheet == pytest.approx(0.5 * 798 / 989)
