"""A submission through the `local` profile (submitit's local executor) trains the debug config for a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_run_args

REPO = Path(__file__).resolve().parent.parent


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_local_submit_trains(tmp_path: Path, tiny_corpus) -> None:
    run_dir = tmp_path / "local run"
    argv = [sys.executable, "launchers/submit.py", "--cluster", "local", "--time", "00:10:00"]
    argv += ["--config", "launch_configs/debug.yaml", *tiny_run_args(run_dir, tiny_corpus, "train.max_steps=6")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "finished" in proc.stdout
    rows = read_rows(run_dir)
    assert rows[-1].get("event") == "finished"
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[-1] == 6
    assert (run_dir / "checkpoints" / "latest").is_file()
    scripts = list((run_dir / "slurm").glob("train-*.sh"))
    assert len(scripts) == 1 and "train.py --config" in scripts[0].read_text()
