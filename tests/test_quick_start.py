"""What a new user hits first (issue 19): short smoke runs, what log.interval does, --print-config on a
machine without the cluster's environment, and missing optional extras."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, tiny_run_args

from recpre.settings import load_settings, settings_notes

CONFIGS = sorted((REPO / "launch_configs").glob("*.yaml"))
CLUSTER_ENV = {"DATA_DIR": "/data/corpus", "RUNS_DIR": "/scratch/runs"}


def without_schedule(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith(("schedule.warmup_steps", "schedule.cooldown_steps"))]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_launch_config_accepts_a_short_smoke_run(config, monkeypatch):
    """Issue 19.3: `train.max_steps=N` over any launch config shortens warmup and cooldown proportionally
    (with a note) instead of refusing a schedule made for thousands of steps."""
    for var, value in CLUSTER_ENV.items():
        monkeypatch.setenv(var, value)
    full = load_settings(config)
    for steps in (1, 5, 50):
        s = load_settings(config, [f"train.max_steps={steps}", "train.max_tokens=null"])
        sc = s.schedule
        assert sc.warmup_steps + sc.cooldown_steps <= steps and sc.batch_size_ramp <= steps
        w, c = full.schedule.warmup_steps, full.schedule.cooldown_steps
        if w + c > steps:
            assert (sc.warmup_steps, sc.cooldown_steps) == (w * steps // (w + c), c * steps // (w + c))
            assert any("shortened" in note for note in settings_notes(s))


def test_the_help_example_and_a_short_debug_run_train(train_module, tiny_corpus, tmp_path, capsys):
    """`python train.py train.max_steps=50` (the --help example) runs; the note says what was shortened."""
    with pytest.raises(SystemExit):
        train_module.parse_args(["--help"])
    example = re.search(r"Example: python train\.py (.*)", capsys.readouterr().out).group(1).split()
    assert example[0] == "--config"
    settings = load_settings(example[1], example[2:])
    assert settings.train.max_steps == 50 and settings_notes(settings)

    args = without_schedule(tiny_run_args(tmp_path / "run", tiny_corpus, "train.max_steps=3", "eval.interval=0",
                                            "log.progress=lines"))  # fmt: skip
    assert train_module.main(["--config", str(REPO / "launch_configs" / "debug.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert "note: the 3 steps of train.max_steps are fewer than schedule.warmup_steps (30) plus" in out
    assert "shortened to 1 and 2 steps" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_a_contradiction_set_in_one_place_is_still_refused():
    """Shortening applies only when the step budget was set after the schedule (a smoke run over a config);
    warmup and budget given together that contradict each other are the user's to fix."""
    from recpre.errors import UserError

    with pytest.raises(UserError, match="schedule.warmup_steps"):
        load_settings(None, ["schedule.warmup_steps=80", "train.max_steps=50"])


def test_log_interval_sets_console_lines_and_metrics_get_every_step(train_module, tiny_corpus, tmp_path, capsys):
    """Issue 19.11: the documented meaning of log.interval is what happens."""
    comment = next(line for line in (REPO / "launch_configs" / "debug.yaml").read_text().splitlines()
                   if line.strip().startswith("interval: 10"))  # fmt: skip
    assert "console" in comment and "metrics.jsonl" in comment and "every step" in comment
    args = tiny_run_args(tmp_path / "run", tiny_corpus, "train.max_steps=7", "log.interval=3", "log.progress=lines")
    assert train_module.main([*args, "eval.interval=0"]) == 0
    shown = [int(m) for m in re.findall(r"^step (\d+)/7", capsys.readouterr().out, flags=re.M)]
    assert shown == [1, 3, 6, 7]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 8))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "RUNS_DIR")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_print_config_marks_an_unset_variable_and_a_run_refuses_it(tmp_path):
    """Issue 19.12: --print-config shows a cluster config without DATA_DIR, the value marked; starting the run
    is what fails (exit code 2, one sentence, nothing written)."""
    argv = [
        sys.executable,
        "train.py",
        "--config",
        "launch_configs/magpie-150m-gpu.yaml",
        f"run.out_dir={tmp_path / 'r'}",
    ]
    shown = subprocess.run([*argv, "--print-config"], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["data"]["train"] == ["<unset $DATA_DIR>/train"]
    assert "DATA_DIR is not set" in shown.stderr
    run = subprocess.run(argv, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert run.returncode == 2 and "DATA_DIR is not set" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()
