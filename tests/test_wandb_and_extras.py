"""wandb with the real client in offline mode, and runs on an installation that lacks an optional extra."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, tiny_run_args

# Runs a command line with some top-level packages made unimportable, as on an installation without the extra.
BLOCK = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def without(packages: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", BLOCK, packages, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def run_id(run: Path) -> str:
    """The run id of an offline run folder, from its `run-<id>.wandb` log (the folder name gains a `-1` suffix
    when two segments start within the same second)."""
    return next(run.glob("run-*.wandb")).stem.removeprefix("run-")


def wandb_config(run: Path) -> dict:
    """The config items recorded in an offline run's .wandb log (protobuf ConfigItem: key = field 1, value_json =
    field 16); wandb 0.31 has no Python reader for its own log, and offline runs write no config.yaml."""
    data = next(run.glob("run-*.wandb")).read_bytes()
    items = {}
    for m in re.finditer(rb"\n([\x01-\x7f])", data):
        start = m.end()
        key, pos = data[start : start + m.group(1)[0]], start + m.group(1)[0]
        if data[pos : pos + 2] != b"\x82\x01" or not re.fullmatch(rb"[A-Za-z_]+", key):
            continue
        pos, size, shift = pos + 2, 0, 0
        while True:  # varint length
            size |= (data[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not data[pos - 1] & 0x80:
                break
        try:
            items[key.decode()] = json.loads(data[pos : pos + size])
        except ValueError:
            continue
    return items


def test_wandb_gets_nested_settings_and_one_id_per_run_folder(train_module, tiny_corpus, tmp_path, monkeypatch):
    """Issue 19.7: the config is the nested settings (filterable by optim.lr), and the run id belongs to the
    run folder: the same across its resumed segments, different for another folder with the same run.name."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["log.wandb.mode=offline", "eval.interval=0", "run.name=same-name"]
    assert train_module.main(tiny_run_args(a, tiny_corpus, *common, "train.max_steps=4")) == 0
    assert train_module.main(tiny_run_args(a, tiny_corpus, *common, "train.max_steps=6")) == 0  # resumes
    assert train_module.main(tiny_run_args(b, tiny_corpus, *common, "train.max_steps=4")) == 0
    runs_a, runs_b = offline_runs(a), offline_runs(b)
    assert len(runs_a) == 2 and len(runs_b) == 1
    ids_a = {run_id(r) for r in runs_a}
    id_b = run_id(runs_b[0])
    assert len(ids_a) == 1 and id_b not in ids_a
    config = wandb_config(runs_a[0])
    assert config["optim"]["lr"] == 3e-3 and config["train"]["max_steps"] == 4
    assert "settings" not in config


def test_wandb_requested_without_wandb_installed_leaves_nothing_behind(tiny_corpus, tmp_path):
    """Issue 19.8: one sentence naming the extra, exit code 2, and no run folder."""
    run = tmp_path / "run"
    out = without("wandb", "train.py", *tiny_run_args(run, tiny_corpus, "log.wandb.mode=offline"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        'error: log.wandb.mode is "offline" but wandb is not installed; pip install -e ".[wandb]" or set '
        "log.wandb.mode=disabled"
    ]
    assert not run.exists()


def test_a_run_without_matplotlib_says_why_there_is_no_plot(tiny_corpus, tmp_path):
    """Issue 19.8: the quick start without the plot extra names what to install instead of saying nothing."""
    run = tmp_path / "run"
    out = without("matplotlib", "train.py", *tiny_run_args(run, tiny_corpus, "log.plot=true", "log.progress=lines",
                                                           "train.max_steps=4", "eval.interval=0"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'loss.png not written: matplotlib is not installed (pip install -e ".[plot]")' in out.stdout
    assert not (run / "loss.png").exists() and (run / "metrics.jsonl").is_file()


def test_evaluate_without_lm_eval_names_the_extra(tmp_path):
    """Issue 19.8: `python evaluate/run.py` without lm-eval gave a ModuleNotFoundError traceback."""
    out = without("lm_eval", "evaluate/run.py", "--checkpoint", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        'error: recpre-evaluate (evaluate/run.py) needs lm-eval, which is not installed; pip install -e ".[eval]"'
    ]
