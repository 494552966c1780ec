"""train.py under torchrun with sharded strategies: fsdp on 2 and 3 ranks, hsdp on 4 (2 x 2), simple-ddp with
optimizer sharding on 2 and 3 ranks each train the same model as one process with the same world batch, hold
1/N of the bytes they promise to shard, and resume from their own checkpoints as if never interrupted."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["n_embd=32", "n_heads=2", "intermediate_size=64", "block_size=32"]
MODELS = {
    "gpt": ["model.name=debug-gpt", *(f"model.overrides.{o}" for o in TINY)],
    # Fixed depth and a zero initial state: the forward is the same function on every rank and in one process.
    "recurrent": [
        "model.name=debug-recurrent",
        *(f"model.overrides.{o}" for o in TINY),
        "model.overrides.mean_recurrence=3",
        "model.overrides.mean_backprop_depth=2",
        "model.overrides.sampling_scheme=fixed",
        "model.overrides.state_init=zero",
        "optim.name=ellis-adam",  # per-tensor update clipping across ranks' pieces
        "optim.weight_decay=1e-4",
        "eval.depths=[1,2]",
    ],
}
STRATEGIES = {
    "fsdp-2": (2, ["fabric.strategy=fsdp"], 2),
    "fsdp-3": (3, ["fabric.strategy=fsdp"], 3),
    "hsdp-2x2": (4, ["fabric.strategy=hsdp", "fabric.shard_size=2"], 2),
    "zero-2": (2, ["fabric.strategy=simple-ddp", "fabric.optimizer_sharding=true", "fabric.shard_group=world"], 2),
    "zero-3": (3, ["fabric.strategy=simple-ddp", "fabric.optimizer_sharding=true", "fabric.shard_group=world"], 3),
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_args(corpus) -> list[str]:
    return [
        "run.name=t",
        "run.seed=7",
        f"data.train=[{corpus.train[0]}]",
        f"data.val=[{corpus.val[0]}]",
        f"data.tokenizer={corpus.tokenizer_dir}",
        "optim.lr=3e-3",
        "train.micro_batch_size=1",
        "train.world_batch_size=12",  # 12 micro-batches per step on 1, 2, 3 or 4 ranks
        "train.max_steps=4",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=1",
        "eval.interval=1000",
        "eval.max_batches=12",
        "checkpoint.interval=2",
        "checkpoint.keep=3",
        "checkpoint.save_before_end_min=0",
        "log.interval=1",
        "log.progress=none",
        "log.plot=false",
        "fabric.device=cpu",
    ]


def run(out: Path, nproc: int, args: list[str]) -> dict:
    cmd = [sys.executable, "train.py", *args, f"run.out_dir={out}"]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        cmd += ["train.py", *args, f"run.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return result(out)


def checkpoint_contents(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, optimizer state in the single-process format) of a single-file or a sharded (DCP) checkpoint."""
    from safetensors.torch import load_file

    from recpre.sharded_checkpoint import is_sharded_checkpoint, read_full_state

    state = torch.load(folder / "state.pt", weights_only=True)
    if is_sharded_checkpoint(folder):
        full = read_full_state(folder, state["optimizer"])
        return full["model"], full["optimizer"]
    return load_file(folder / "model.safetensors"), state["optimizer"]


def result(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights, optimizer = checkpoint_contents(out / "checkpoints" / "step-00000004")
    return {
        "losses": [r["loss"] for r in rows if "loss" in r],
        "grad_norms": [r["grad_norm"] for r in rows if "loss" in r],
        "skipped": [r["step"] for r in rows if r.get("event") == "skipped_step"],
        "val": [r["val_loss"] for r in rows if "val_loss" in r],
        "memory": [r for r in rows if r.get("event") == "memory"],
        "weights": weights,
        "optimizer": optimizer,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    """Each run once per module: {(model, strategy): result}; "single" is the one-process reference."""
    cache: dict = {}

    def get(model: str, strategy: str) -> dict:
        if (model, strategy) not in cache:
            out = tmp_path_factory.mktemp(f"{model}-{strategy}")
            nproc, extra = (1, ["fabric.strategy=single"]) if strategy == "single" else STRATEGIES[strategy][:2]
            cache[model, strategy] = run(out, nproc, [*common_args(tiny_corpus), *MODELS[model], *extra])
            cache[model, strategy]["dir"] = out
        return cache[model, strategy]

    return get


def assert_same_training(got: dict, ref: dict) -> None:
    assert len(got["losses"]) == 4 and len(got["val"]) == 2
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["val"] == pytest.approx(ref["val"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)  # Adam would hide a scaled gradient
    assert got["weights"].keys() == ref["weights"].keys()
    # The tolerance of tests/test_fabric_train.py: Adam amplifies summation-order rounding of nearly cancelling
    # gradients; a wrong gradient or a lost update moves weights by ~lr (3e-3) per step.
    diffs = torch.cat([(w - ref["weights"][n]).abs().flatten() for n, w in got["weights"].items()])
    for name, w in got["weights"].items():
        torch.testing.assert_close(w, ref["weights"][name], rtol=0, atol=5e-5, msg=name)
    assert int((diffs > 1e-5).sum()) <= 1e-5 * diffs.numel(), f"{int((diffs > 1e-5).sum())} elements off by > 1e-5"


def padding_bytes(weights: dict[str, torch.Tensor], parts: int) -> int:
    """Bytes FSDP adds on the largest shard: each tensor is cut along dim 0 in ceil(rows / N) row pieces."""
    pad = 0
    for w in weights.values():
        rows, row = w.shape[0], w[0].numel() if w.dim() > 1 else 1
        pad += (math.ceil(rows / parts) - rows / parts) * row * 4
    return int(pad) + 1


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model", list(MODELS))
def test_sharded_run_matches_one_process(runs, model, strategy):
    ref, got = runs(model, "single"), runs(model, strategy)
    assert_same_training(got, ref)
    # Checkpoints hold the single-process optimizer format: same tensors, same shapes.
    for idx, entry in ref["optimizer"]["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert got["optimizer"]["state"][idx][key].shape == value.shape
    (mem,) = got["memory"]
    (one,) = ref["memory"]
    parts = STRATEGIES[strategy][2]
    pad = padding_bytes(ref["weights"], parts)
    sharded = ["optimizer_bytes"] + (["params_bytes", "grads_bytes"] if not strategy.startswith("zero") else [])
    for key in sharded:
        allowed = 2 * pad if key == "optimizer_bytes" else pad
        assert one[key] / parts * 0.95 <= mem[key] <= one[key] / parts * 1.05 + allowed, (key, mem[key], one[key])
    for key in {"params_bytes", "grads_bytes"} - set(sharded):
        assert mem[key] == one[key], key
    assert mem["peak_bytes"] is None and mem["strategy"] == STRATEGIES[strategy][1][0].split("=")[1]


@pytest.mark.parametrize(("model", "strategy"), [("recurrent", "fsdp-2"), ("gpt", "zero-2"), ("recurrent", "hsdp-2x2")])
def test_resumed_sharded_run_equals_the_uninterrupted_one(runs, tiny_corpus, tmp_path, model, strategy):
    """Stopped after the step-2 checkpoint (the later ones removed), resumed at the same world size."""
    whole = runs(model, strategy)
    cut = tmp_path / "cut"
    shutil.copytree(whole["dir"], cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(r for r in rows if json.loads(r).get("step", 0) <= 2) + "\n")
    nproc, extra = STRATEGIES[strategy][:2]
    resumed = run(cut, nproc, [*common_args(tiny_corpus), *MODELS[model], *extra])
    assert resumed["losses"][-2:] == pytest.approx(whole["losses"][-2:], rel=1e-6)
    for name, w in resumed["weights"].items():
        torch.testing.assert_close(w, whole["weights"][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["fsdp-2", "zero-2"])
def test_skipped_nonfinite_step_and_activation_checkpointing_match_one_process(tiny_corpus, tmp_path, strategy):
    """Gradients poisoned at step 2 (RECPRE_DEBUG_NAN_STEPS): every rank sees the same non-finite norm and skips
    the step, as one process does; recomputing the core in backward changes nothing either."""
    args = [*common_args(tiny_corpus), *MODELS["recurrent"], "model.activation_checkpointing=true"]
    os.environ["RECPRE_DEBUG_NAN_STEPS"] = "2"
    try:
        ref = run(tmp_path / "one", 1, [*args, "fabric.strategy=single"])
        nproc, extra = STRATEGIES[strategy][:2]
        got = run(tmp_path / "sharded", nproc, [*args, *extra])
    finally:
        del os.environ["RECPRE_DEBUG_NAN_STEPS"]
    assert got["skipped"] == ref["skipped"] == [2]
    got["grad_norms"][1] = ref["grad_norms"][1] = 0.0  # not finite: logged as null
    assert_same_training(got, ref)
