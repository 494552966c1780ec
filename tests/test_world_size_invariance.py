"""The recurrent model trains the same on 1, 2 and 4 processes at the same global batch and micro-batch size:
depths and initial-state noise are keyed by global micro-batch, never by rank (recpre/recurrence.py,
recpre/train_step.py), with lockstep on (one depth per step) and off (one per global micro-batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_args

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, corpus, nproc: int, *extra: str) -> tuple[list[float], list[dict], list]:
    """(step losses, validation rows, sampled depths) of a 3-step run of the tiny recurrent model."""
    args = tiny_run_args(
        out,
        corpus,
        "train.max_steps=3",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=1",
        "train.micro_batch_size=2",
        "train.world_batch_size=8",  # 4 micro-batches: 1 x 4, 2 x 2, 4 x 1
        "eval.interval=3",
        "eval.max_batches=4",
        "checkpoint.interval=0",
        "model.overrides.mean_recurrence=4",
        "model.overrides.mean_backprop_depth=2",
        "fabric.strategy=" + ("single" if nproc == 1 else "simple-ddp"),
        *extra,
    )
    cmd = [sys.executable, "train.py", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        cmd += ["train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    return [r["loss"] for r in train_rows], [r for r in rows if "val_loss" in r], [r["depth"] for r in train_rows]


@pytest.mark.parametrize("lockstep", ["true", "false"])
def test_recurrent_model_trains_the_same_on_1_2_and_4_processes(tiny_corpus, tmp_path, lockstep):
    results = {n: run(tmp_path / f"p{n}", tiny_corpus, n, f"train.recurrence.lockstep={lockstep}") for n in (1, 2, 4)}
    losses, vals, _ = results[1]
    assert len(losses) == 3 and len(vals) == 2
    for n in (2, 4):
        assert results[n][0] == pytest.approx(losses, rel=1e-5), f"{n} processes: training losses"
        for a, b in zip(results[n][1], vals, strict=True):
            assert {k: a[k] for k in a if k.startswith("val_loss")} == pytest.approx(
                {k: b[k] for k in b if k.startswith("val_loss")}, rel=1e-5
            ), f"{n} processes: validation"
    if lockstep == "true":  # one depth per optimizer step, the same for every process count
        assert results[1][2] == results[2][2] == results[4][2]
