"""A submission through the `local` profile (submitit's local executor) trains the debug config for a few steps."""

from __future__ import annotations

import json
import os
import re
import shutil
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


def test_local_jobs_run_the_submitting_interpreter(tmp_path: Path, tiny_corpus) -> None:
    """Issue 19.9: the local profile ran `python` from PATH (missing, or another environment). Here PATH's
    `python` is a stand-in that fails; the job must run the interpreter that ran submit.py, and the submit
    command says where the job's log is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    (bin_dir / "python").write_text("#!/bin/sh\necho 'python from PATH ran' >&2\nexit 97\n")
    (bin_dir / "python").chmod(0o755)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "launchers/submit.py", "--cluster", "local", "--time", "00:10:00"]
    argv += [
        "--config",
        "launch_configs/debug.yaml",
        *tiny_run_args(run_dir, tiny_corpus, "train.max_steps=4", "log.progress=lines"),
    ]
    env = {**os.environ, "PATH": str(bin_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = Path(re.search(r"^job log: (.+)$", proc.stdout, flags=re.M).group(1))
    assert log.is_file() and "step 4/4" in log.read_text()
    assert read_rows(run_dir)[-1].get("event") == "finished"
