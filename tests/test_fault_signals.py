"""SIGTERM and SIGUSR1 sent to a real `python train.py` while it trains: it saves at the next step boundary, stops
with exit code 0, requeues its SLURM job only for USR1 (a time signal; TERM is `scancel` or preemption), and the
same command resumes from that checkpoint with the losses and final weights of an uninterrupted run.

The job is faked by SLURM_JOB_ID and an `scontrol` on PATH that records what it is asked. USR2 and the deadline
run through a real SLURM in tests/test_launch_slurm.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre.checkpoint import find_latest, verify_checkpoint
from recpre.monitor import read_metrics

STEPS = 12
EXTRA = [f"train.max_steps={STEPS}", "checkpoint.interval=0", "eval.interval=4"]


def args_for(run: Path, corpus) -> list[str]:
    return tiny_run_args(run, corpus, *EXTRA)


def loss_rows(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(train_module, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_module.main(args_for(run, tiny_corpus)) == 0
    return run


@pytest.mark.parametrize(("sig", "reason", "requeued"), [("SIGTERM", "SIGTERM", False), ("SIGUSR1", "SIGUSR1", True)])
def test_a_signal_saves_at_the_next_step_stops_and_the_same_command_resumes(
    sig, reason, requeued, train_module, tiny_corpus, reference, tmp_path, capsys
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = requeue ]\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "42",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args_for(run, tiny_corpus)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(loss_rows(run)) < 3 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]

    stopped = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == reason, stopped
    at = stopped[0]["step"]
    assert 3 <= at < STEPS and max(loss_rows(run)) == at, "the save is at the step boundary after the signal"
    latest = find_latest(run / "checkpoints")
    assert latest.name == f"step-{at:08d}" and (run / "checkpoints" / "latest").read_text().strip() == latest.name
    verify_checkpoint(latest)
    calls = log.read_text().splitlines() if log.is_file() else []
    assert ("requeue 42" in calls) == requeued, calls

    capsys.readouterr()
    assert train_module.main(args_for(run, tiny_corpus) + ["log.progress=lines"]) == 0
    assert f"resumed from {latest.name}" in capsys.readouterr().out
    assert loss_rows(run) == loss_rows(reference)
    ref, got = final_weights(reference), final_weights(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
