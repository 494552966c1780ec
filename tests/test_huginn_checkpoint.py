"""Huginn folder -> recpre checkpoint -> train.py fine-tuning -> Huginn folder again (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recpre.checkpoint import load_model
from recpre.data.packed import PackedWriter
from recpre.interop.huginn import from_huginn
from recpre.interop.huginn_checkpoint import export_huginn_checkpoint, import_huginn_checkpoint, registry_overrides

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "huginn-tiny"


def _tokens_dataset(folder: Path, *, rows: int, block_size: int, vocab: int, seed: int) -> Path:
    """Packed rows of a repeating pattern (learnable) with token ids below the tiny model's vocab of 256."""
    folder.mkdir(parents=True)
    writer = PackedWriter(folder, block_size, meta={"vocab_size": vocab, "eos_id": 1, "pad_id": 2})
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, vocab, size=17)
    writer.add_tokens(np.tile(pattern, rows * (block_size + 1) // 17 + 1)[: rows * (block_size + 1)].astype(np.int32))
    writer.close()
    return folder


def test_import_gives_a_checkpoint_with_the_reference_weights_and_shape(tmp_path):
    path = import_huginn_checkpoint(FIXTURE, tmp_path / "run")
    model, settings = load_model(tmp_path / "run")
    reference = from_huginn(FIXTURE)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert settings.model.name == "huginn-tiny"
    assert path.name == "step-00000000"


def test_registry_overrides_rebuild_a_shape_that_is_not_in_the_registry():
    from recpre.config import ModelConfig

    config = ModelConfig.from_name("huginn-tiny", n_layers_core=3, mean_recurrence=6)
    name, overrides = registry_overrides(config)
    assert name == "huginn-tiny" and overrides == {"n_layers_core": 3, "mean_recurrence": 6}


def test_import_refuses_a_folder_without_config_and_an_existing_run(tmp_path):
    from recpre.errors import UserError

    with pytest.raises(UserError, match="config.json"):
        import_huginn_checkpoint(tmp_path, tmp_path / "run")
    import_huginn_checkpoint(FIXTURE, tmp_path / "run")
    with pytest.raises(UserError, match="already holds checkpoints"):
        import_huginn_checkpoint(FIXTURE, tmp_path / "run")


def test_imported_model_fine_tunes_through_train_py_and_exports_back(tmp_path):
    subprocess.run(
        [sys.executable, "evaluate/import_huginn.py", "--input", str(FIXTURE), "--output", str(tmp_path / "imported")],
        cwd=ROOT,
        check=True,
    )
    data = _tokens_dataset(tmp_path / "train", rows=64, block_size=32, vocab=256, seed=0)
    val = _tokens_dataset(tmp_path / "val", rows=8, block_size=32, vocab=256, seed=0)
    run = tmp_path / "finetune"
    args = [
        sys.executable,
        "train.py",
        "model.name=huginn-tiny",
        f"run.init_from={tmp_path / 'imported'}",
        f"run.out_dir={run}",
        f"data.train=[{data}]",
        f"data.val=[{val}]",
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "train.world_batch_size=8",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=1",
        "optim.lr=3e-3",
        "eval.interval=6",
        "eval.max_batches=2",
        "eval.depths=[1,2]",
        "checkpoint.interval=0",
        "log.progress=none",
        "log.plot=false",
        "fabric.device=cpu",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args, cwd=ROOT, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val_losses[-1] < val_losses[0]

    out = tmp_path / "exported"
    subprocess.run(
        [sys.executable, "evaluate/export_huginn.py", "--checkpoint", str(run), "--output", str(out)],
        cwd=ROOT,
        check=True,
    )
    exported = load_file(out / "model.safetensors")
    trained, _ = load_model(run)
    assert torch.equal(exported["transformer.wte.weight"], trained.state_dict()["transformer.wte.weight"])
    assert torch.equal(exported["lm_head.weight"], exported["transformer.wte.weight"])
    before = load_file(FIXTURE / "model.safetensors")
    assert set(exported) == set(before)
    assert not torch.equal(
        exported["transformer.core_block.0.attn.Wqkv.weight"], before["transformer.core_block.0.attn.Wqkv.weight"]
    )
    # Fine-tuning started from the imported weights: 6 small steps stay close to them (a fresh init would not).
    drift = (exported["transformer.wte.weight"] - before["transformer.wte.weight"]).norm() / before[
        "transformer.wte.weight"
    ].norm()
    assert drift < 0.3, drift
    again = from_huginn(out)  # the exported folder reads back in the reference format
    for name, tensor in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_export_refuses_a_non_empty_output(tmp_path):
    from recpre.errors import UserError

    import_huginn_checkpoint(FIXTURE, tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_huginn_checkpoint(tmp_path / "run", tmp_path / "out")
