"""Fine-tuning on conversations keeps the driver's promises: 2 processes equal one at the same global batch (the
assistant-token normaliser is global, not per rank), and a run stopped by a signal (the path a SLURM time limit
takes) resumes to the losses of an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHAT_BLOCK, REPO, signal_after_step, tiny_run_args
from test_world_size_invariance import free_port

pytestmark = pytest.mark.slow


def conversations(path: Path) -> Path:
    """Replies of very different lengths, so micro-batches hold different numbers of assistant tokens."""
    rows = []
    for i in range(48):
        reply = " ".join(["It is", str(i)] + ["and so on"] * (i % 7))
        rows.append(
            {"messages": [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": reply}]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_args(out: Path, corpus, data: Path, *extra: str) -> list[str]:
    args = [
        a for a in tiny_run_args(out, corpus) if not a.startswith(("data.train", "data.val", "model.overrides.block"))
    ]
    return [
        *args,
        f"model.overrides.block_size={CHAT_BLOCK}",
        f"data.train=[{data}]",
        "data.format=chat",
        "data.document_mask=true",
        f"data.cache_dir={out.parent / 'cache'}",
        "train.loss_on=assistant",
        "train.max_steps=4",
        "train.micro_batch_size=1",
        "train.world_batch_size=4",
        "schedule.warmup_steps=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        *extra,
    ]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_chat_fine_tuning_on_2_processes_equals_one(tiny_corpus, tmp_path):
    data = conversations(tmp_path / "chat.jsonl")
    results = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        args = sft_args(out, tiny_corpus, data, "fabric.strategy=" + ("single" if n == 1 else "simple-ddp"))
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run"]
        launch += [] if n == 1 else [f"--nproc_per_node={n}", f"--master_port={free_port()}"]
        proc = subprocess.run([*launch, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[n] = losses(out)
    assert len(results[1]) == 4
    assert list(results[2].values()) == pytest.approx(list(results[1].values()), rel=1e-5)


def test_chat_fine_tuning_stopped_by_a_signal_resumes_to_the_same_losses(
    train_module, tiny_corpus, tmp_path, monkeypatch
):
    data = conversations(tmp_path / "chat.jsonl")
    ref, split = tmp_path / "ref", tmp_path / "split"
    assert train_module.main(sft_args(ref, tiny_corpus, data)) == 0
    with signal_after_step(2):
        assert train_module.main(sft_args(split, tiny_corpus, data)) == 0
    assert sorted(losses(split)) == [1, 2]
    assert train_module.main(sft_args(split, tiny_corpus, data)) == 0
    assert losses(split) == losses(ref)
