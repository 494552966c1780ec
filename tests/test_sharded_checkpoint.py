"""Sharded checkpoints (DCP, each rank writes its own shards) and resuming at another world size or strategy:
train.py under torchrun with gloo, real folders, real damage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recpre.checkpoint import STATE_FILE, find_latest
from recpre.sharded_checkpoint import DCP_METADATA, is_sharded_checkpoint, model_weights, read_full_state

REPO = Path(__file__).resolve().parent.parent
GPT = [
    "model.name=debug-gpt",
    "model.overrides.n_embd=32",
    "model.overrides.n_heads=2",
    "model.overrides.intermediate_size=64",
    "model.overrides.block_size=32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_args(corpus, steps: int) -> list[str]:
    return [
        "run.name=t",
        "run.seed=7",
        f"data.train=[{corpus.train[0]}]",
        f"data.val=[{corpus.val[0]}]",
        f"data.tokenizer={corpus.tokenizer_dir}",
        "optim.lr=3e-3",
        "train.micro_batch_size=1",
        "train.world_batch_size=6",  # 6 micro-batches per step on 1, 2 or 3 ranks
        f"train.max_steps={steps}",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=0",  # constant after warmup: the schedule does not depend on max_steps
        "eval.interval=1000",
        "eval.max_batches=6",
        "checkpoint.interval=3",
        "checkpoint.keep=10",
        "checkpoint.save_before_end_min=0",
        "log.interval=1",
        "log.progress=none",
        "log.plot=false",
        "fabric.device=cpu",
        *GPT,
    ]


def train(out: Path, nproc: int, args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args, f"run.out_dir={out}"]
    if nproc > 1:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        cmd = [*head, "train.py", *args, f"run.out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    if is_sharded_checkpoint(folder):
        return model_weights(folder)
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_close_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """The 2-vs-1-process tolerance of tests/test_sharding_train.py."""
    assert set(ref) <= set(got)
    diffs = torch.cat([(got[n] - w).abs().flatten() for n, w in ref.items()])
    for name, w in ref.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=5e-5, msg=name)
    assert int((diffs > 1e-5).sum()) <= 1e-5 * diffs.numel() + 1


@pytest.fixture(scope="module")
def single_18(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("single18")
    train(out, 1, [*common_args(tiny_corpus, 18), "fabric.strategy=single"])
    return out


def saved_before_later_steps(out: Path, step: int) -> bool:
    """Whether metrics.jsonl records checkpoint `step` complete only after a later step's loss row: the loop went
    on while it was written (an asynchronous save is confirmed at the next save or at the end)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = next(i for i, r in enumerate(rows) if r.get("event") == "checkpoint" and r["step"] == step)
    return any("loss" in r and r["step"] > step for r in rows[:saved])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fsdp_2_then_ddp_3_then_one_process_equals_18_uninterrupted_steps(mode, single_18, tiny_corpus, tmp_path):
    """With checkpoint.async every leg's checkpoints are written by a background thread while training goes on
    (DCP shards from each rank on the saver's own gloo group, then the gathered format on 3 ranks)."""
    out = tmp_path / "chain"
    asynchronous = ["checkpoint.async=true"] if mode == "async" else []
    train(out, 2, [*common_args(tiny_corpus, 6), "fabric.strategy=fsdp", *asynchronous])
    assert saved_before_later_steps(out, 3) == bool(asynchronous)
    if asynchronous:  # the snapshot holds the weights of step 3, not of the steps trained while it was written
        ref3 = weights_of(single_18 / "checkpoints" / "step-00000003")
        assert_close_weights(weights_of(out / "checkpoints" / "step-00000003"), ref3)
    ckpt = out / "checkpoints" / "step-00000006"
    assert is_sharded_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    shards = sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp")
    assert len(shards) == 2, shards  # each rank wrote its own shards
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {DCP_METADATA, *shards} <= set(manifest)
    train(out, 3, [*common_args(tiny_corpus, 12), "fabric.strategy=simple-ddp", *asynchronous])
    train(out, 1, [*common_args(tiny_corpus, 18), "fabric.strategy=single", *asynchronous])
    got, ref = losses(out), losses(single_18)
    assert sorted(got) == list(range(1, 19))
    assert [got[s] for s in range(1, 19)] == pytest.approx([ref[s] for s in range(1, 19)], rel=1e-5)
    final = "step-00000018"
    assert_close_weights(weights_of(out / "checkpoints" / final), weights_of(single_18 / "checkpoints" / final))


@pytest.mark.slow
def test_zero_sharded_checkpoint_resumes_on_hsdp_and_one_process(single_18, tiny_corpus, tmp_path):
    """Optimizer-sharded simple-ddp writes its slices; hsdp (2 x 1) and then one process continue from them."""
    out = tmp_path / "zero"
    zero = ["fabric.strategy=simple-ddp", "fabric.optimizer_sharding=true", "fabric.shard_group=world"]
    train(out, 3, [*common_args(tiny_corpus, 6), *zero])
    ckpt = out / "checkpoints" / "step-00000006"
    assert is_sharded_checkpoint(ckpt)
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    full = read_full_state(ckpt, saved["optimizer"])
    assert full["optimizer"]["state"], "the optimizer slices of every rank are in the checkpoint"
    train(out, 2, [*common_args(tiny_corpus, 12), "fabric.strategy=hsdp", "fabric.shard_size=1"])
    train(out, 1, [*common_args(tiny_corpus, 18), "fabric.strategy=single"])
    got, ref = losses(out), losses(single_18)
    assert [got[s] for s in range(1, 19)] == pytest.approx([ref[s] for s in range(1, 19)], rel=1e-5)


def test_damaged_shard_is_detected_and_the_previous_checkpoint_used(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    train(out, 2, [*common_args(tiny_corpus, 6), "fabric.strategy=fsdp"])
    root = out / "checkpoints"
    newest, previous = root / "step-00000006", root / "step-00000003"
    assert is_sharded_checkpoint(newest) and is_sharded_checkpoint(previous)
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"skipping bad checkpoint .*step-00000006.*__1_0\.distcp"):
        assert find_latest(root) == previous
    proc = train(out, 1, [*common_args(tiny_corpus, 6), "fabric.strategy=single"])
    assert "step-00000006" in proc.stderr  # the warning names the damaged one
    assert (root / "latest").read_text().strip() == "step-00000006"  # re-saved from step 3 onwards
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_load_model_on_a_sharded_checkpoint_gives_the_trained_logits(tiny_corpus, tmp_path):
    """One process builds the whole model from 2 ranks' fsdp shards; its logits are those of the same training
    in one process (the 2-vs-1 tolerance), which a wrong or partial load would miss by far."""
    from recpre.checkpoint import load_model

    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    train(sharded, 2, [*common_args(tiny_corpus, 3), "fabric.strategy=fsdp"])
    train(single, 1, [*common_args(tiny_corpus, 3), "fabric.strategy=single"])
    assert is_sharded_checkpoint(sharded / "checkpoints" / "step-00000003")
    got, _ = load_model(sharded)
    ref, _ = load_model(single)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(ids), ref(ids)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (a - b).abs().max() < 1e-2 * (b - b.mean()).abs().max()
