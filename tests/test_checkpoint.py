"""Checkpoints: layout, safe loading, atomicity, fallback past a bad one, retention, shape checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recpre.checkpoint import (
    LATEST,
    CheckpointError,
    check_same_shape,
    find_latest,
    list_checkpoints,
    load_model,
    load_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.model import build_model
from recpre.settings import load_settings, settings_to_yaml

TINY = {"n_embd": 32, "n_heads": 2, "intermediate_size": 64, "block_size": 16, "vocab_size": 128}


@pytest.fixture
def setup(tmp_path):
    overrides = [f"model.overrides.{k}={v}" for k, v in TINY.items()] + [f"run.out_dir={tmp_path}"]
    settings = load_settings(None, overrides)
    config = ModelConfig.from_name("debug-recurrent", **TINY)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)), num_steps=(1, 1)).loss.backward()
    optimizer.step()
    return settings, config, model, optimizer, tmp_path / "checkpoints"


def save(setup, step, keep=0):
    settings, config, model, optimizer, root = setup
    return save_checkpoint(
        root,
        step,
        model=model,
        model_config=config.to_dict(),
        settings_yaml=settings_to_yaml(settings),
        state={"optimizer": optimizer.state_dict(), "progress": {"step": step}},
        rank_state={"loader": {"batches": step, "positions": [1, 2]}, "rng": rng_state()},
        keep=keep,
    )


def test_layout_manifest_and_safe_state(setup):
    path = save(setup, 12)
    assert path.name == "step-00000012"
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "state.pt",
        "settings.yaml",
        "model_config.json",
        "manifest.json",
    }
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "settings.yaml", "model_config.json"}
    assert (path.parent / LATEST).read_text().strip() == "step-00000012"
    state = torch.load(path / "state.pt", weights_only=True)  # no arbitrary pickles needed
    assert state["step"] == 12 and state["rank"]["loader"]["positions"] == [1, 2]
    assert load_state(path)["progress"] == {"step": 12}
    assert not list(path.parent.glob(".tmp-*"))


def test_load_model_from_folder_run_and_latest(setup):
    settings, config, model, _, root = setup
    save(setup, 3)
    for where in (root / "step-00000003", root.parent, root / LATEST, root):
        loaded, loaded_settings = load_model(where)
        assert not loaded.training
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
        assert loaded_settings == settings


def test_retention_keeps_the_last_k(setup):
    for step in (1, 2, 3, 4):
        save(setup, step, keep=2)
    root = setup[-1]
    assert [p.name for p in list_checkpoints(root)] == ["step-00000003", "step-00000004"]


def test_torn_and_corrupt_checkpoints_fall_back_with_a_warning(setup):
    root = setup[-1]
    save(setup, 1)
    save(setup, 2)
    # a save that died before its manifest: never listed, never loaded
    torn = root / "step-00000003"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    # the newest complete one gets corrupted on disk
    bad = root / "step-00000002" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(root / "step-00000002")
    with pytest.warns(UserWarning, match="step-00000002"):
        assert find_latest(root).name == "step-00000001"
    with pytest.raises(UserError, match="cannot be used"):
        resolve_checkpoint(root / "step-00000002")


def test_a_missing_file_is_detected(setup):
    path = save(setup, 5)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(path)
    with pytest.warns(UserWarning, match="state.pt is missing"):
        assert find_latest(setup[-1]) is None


def test_other_shape_is_refused_with_the_differing_fields(setup):
    settings, config, model, _, root = setup
    path = save(setup, 1)
    other = ModelConfig.from_name("debug-recurrent", **{**TINY, "n_embd": 64, "intermediate_size": 96})
    with pytest.raises(UserError, match="n_embd 32 .checkpoint. vs 64") as err:
        check_same_shape(path, other.to_dict())
    assert "intermediate_size" in str(err.value) and "block_size" not in str(err.value)
    with pytest.raises(UserError, match="different model shape"):
        load_weights(build_model(other), path, config=other.to_dict())
    # runtime choices are not shape
    check_same_shape(path, {**config.to_dict(), "attention": "eager", "fused_head": "chunked"})


def test_rng_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a[0]) and random.random() == a[1]


def test_not_a_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_manifest_is_json_with_sizes(setup):
    path = save(setup, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7
    assert manifest["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size


def test_init_weights_from_a_huginn_folder():
    from recpre.weights import load_initial_weights as load_weights

    fixture = Path(__file__).parent / "fixtures" / "huginn-tiny"
    config = ModelConfig.from_name("huginn-tiny")
    model = build_model(config)
    load_weights(model, fixture, config=config.to_dict())
    reference = load_file(fixture / "model.safetensors")
    name = "transformer.wte.weight"
    assert torch.equal(model.state_dict()[name], reference[name].float())
    other = ModelConfig.from_name("huginn-tiny", n_embd=config.n_embd * 2)
    with pytest.raises(UserError, match="different model shape"):
        load_weights(build_model(other), fixture, config=other.to_dict())
