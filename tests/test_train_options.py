"""Whole training runs with options that otherwise only have unit tests: document masking and per-document
positions, and bf16-mixed precision on the CPU.

Each option must reach the model: a run with it trains on different numbers than a run without it, and still
trains (finite losses, a complete checkpoint).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_args

from recpre.checkpoint import find_latest, load_state, verify_checkpoint
from recpre.data.packed import PackedWriter
from recpre.monitor import read_metrics

STEPS = ["train.max_steps=3", "eval.interval=0", "checkpoint.interval=0", "schedule.warmup_steps=1"]
STEPS += ["schedule.cooldown_steps=1"]


def losses(run: Path) -> list[float]:
    rows = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(x) for x in rows), rows
    return rows


@pytest.fixture(scope="module")
def short_documents(tiny_corpus, tmp_path_factory):
    """Rows of 33 tokens (block 32) of the tiny corpus's vocabulary with an EOS every 4-11 tokens: every sequence
    holds several documents, so masking and position resets change every forward pass."""
    folder = tmp_path_factory.mktemp("short-documents") / "train"
    folder.mkdir()
    meta = {"eos_id": tiny_corpus.eos_id, "pad_id": tiny_corpus.pad_id, "vocab_size": tiny_corpus.vocab_size}
    rng = np.random.default_rng(0)
    rows = rng.integers(3, tiny_corpus.vocab_size, size=(256, 33), dtype=np.int32)
    for row in rows:
        at = 0
        while (at := at + int(rng.integers(4, 12))) < 33:
            row[at] = tiny_corpus.eos_id
    writer = PackedWriter(folder, 32, meta=meta)
    writer.add_rows(rows)
    writer.close()
    return folder


def test_document_mask_and_position_resets_train_end_to_end(train_module, tiny_corpus, short_documents, tmp_path):
    flags = {
        "plain": [],
        "mask": ["data.document_mask=true"],
        "positions": ["data.reset_position_ids=true"],
        "both": ["data.document_mask=true", "data.reset_position_ids=true"],
    }
    runs = {}
    for name, extra in flags.items():
        run = tmp_path / name
        args = tiny_run_args(run, tiny_corpus, *STEPS, f"data.train=[{short_documents}]", *extra)
        assert train_module.main(args) == 0, name
        runs[name] = losses(run)
        verify_checkpoint(find_latest(run / "checkpoints"))
    # each option changes what the model computes from the very first step
    first = {name: values[0] for name, values in runs.items()}
    assert first["mask"] != first["plain"] and first["positions"] != first["plain"], first
    assert first["mask"] != first["positions"], first
    # RoPE depends on relative positions only: inside masked documents, restarting positions changes nothing
    assert runs["both"] == pytest.approx(runs["mask"], rel=1e-5), runs


def test_bf16_mixed_precision_trains_end_to_end_on_the_cpu(train_module, tiny_corpus, tmp_path):
    """Autocast to bfloat16 for the matrix products, float32 master weights and optimizer state."""
    results = {}
    for precision in ("fp32", "bf16-mixed"):
        run = tmp_path / precision
        assert train_module.main(tiny_run_args(run, tiny_corpus, *STEPS, f"fabric.precision={precision}")) == 0
        results[precision] = losses(run)
        folder = find_latest(run / "checkpoints")
        verify_checkpoint(folder)
        from safetensors.torch import load_file

        assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float32}
        moments = load_state(folder)["optimizer"]["state"]
        assert {t.dtype for s in moments.values() for k, t in s.items() if k != "step"} == {torch.float32}
    fp32, bf16 = results["fp32"], results["bf16-mixed"]
    assert bf16[0] != fp32[0], "bf16-mixed must actually compute in bfloat16"
    assert all(abs(a - b) < 0.05 * a for a, b in zip(fp32, bf16)), (fp32, bf16)
