"""Huginn-0125 interop: the fixture's reference logits, bit-exact round trips, loud errors, the 3.5B shape."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.interop.huginn import from_huginn, huginn_config_to_model_config, to_huginn
from recpre.model import RecurrentGPT, build_model

FIXTURE = Path(__file__).parent / "fixtures" / "huginn-tiny"

# The public tomg-group-umd/huginn-0125 config.json (architectural fields as published; REFERENCE.md section 1).
REAL_CONFIG = {
    "activation_checkpoint_impl": "per-iteration",
    "architecture_class_name": "RecurrentGPT",
    "architectures": ["RavenForCausalLM"],
    "bias": False,
    "block_class_name": "SandwichBlock",
    "block_size": 4096,
    "bos_token_id": 65504,
    "effective_expected_depth": 132,
    "eos_token_id": 65505,
    "head_dim": 96,
    "init_orthogonal": False,
    "init_strategy": "takase",
    "init_values": {
        "embed_scale": 72.6636084983398,
        "embedding": 0.008703882797784892,
        "out_proj": 0.0005356869554443541,
        "std": 0.008703882797784892,
    },
    "injection_type": "linear",
    "intermediate_size": 17920,
    "mean_backprop_depth": 8,
    "mean_recurrence": 32,
    "mlp_class_name": "GatedMLP",
    "model_type": "huginn_raven",
    "n_embd": 5280,
    "n_heads": 55,
    "n_layers": 8,
    "n_layers_in_coda": 2,
    "n_layers_in_prelude": 2,
    "n_layers_in_recurrent_block": 4,
    "nonlin_name": "SiLU",
    "norm_class_name": "RMSNorm_llama",
    "norm_eps": 1e-06,
    "num_key_value_heads": 55,
    "pad_token_id": 65509,
    "padded_vocab_size": 65536,
    "padding_multiple": 4096,
    "qk_bias": True,
    "rope_base": 50000,
    "sampling_scheme": "poisson-lognormal-filling",
    "state_init": "like-init",
    "test_time_noise": 0,
    "test_time_noise_type": "fixed",
    "tie_embeddings": True,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.2",
    "vocab_size": 65536,
}


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    folder = tmp_path / "huginn-tiny"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURE / name, folder / name)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_reproduces_reference_logits(steps, backend):
    model = from_huginn(FIXTURE, state_init="zero").eval()
    model.config.attention = backend
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"], num_steps=steps).logits
    torch.testing.assert_close(logits, expected[f"logits_steps_{steps}"], rtol=0, atol=1e-4)


def test_fixture_config_is_the_registry_shape():
    imported = from_huginn(FIXTURE, device="meta").config.to_dict()
    registry = ModelConfig.from_name("huginn-tiny").to_dict()
    imported.pop("name"), registry.pop("name")
    assert imported == registry


def test_round_trip_is_bit_exact(tmp_path):
    model = from_huginn(FIXTURE)
    to_huginn(model, tmp_path / "out")
    original, exported = load_file(FIXTURE / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype and torch.equal(original[name], exported[name]), name
    again = from_huginn(tmp_path / "out")
    assert again.config.name == "out"  # named after its folder
    assert replace(again.config, name=model.config.name) == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_round_trip_keeps_bfloat16(tmp_path):
    model = from_huginn(FIXTURE)
    to_huginn(model, tmp_path / "bf16", dtype=torch.bfloat16)
    again = from_huginn(tmp_path / "bf16", dtype=torch.bfloat16)
    to_huginn(again, tmp_path / "bf16-again")
    a, b = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "bf16-again" / "model.safetensors")
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copyfile(FIXTURE / "config.json", folder / "config.json")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = from_huginn(folder)
    for name, p in model.named_parameters():
        assert torch.equal(p, tensors[name]), name


def test_freqs_cis_buffer_is_recognised(fixture_copy):
    """A checkpoint that also stores the RoPE table (a buffer, not a weight) loads the same weights."""
    _edit_tensors(fixture_copy, lambda t: t.update(freqs_cis=torch.zeros(1, 32, 1, 8, 2)))
    got, want = from_huginn(fixture_copy).state_dict(), from_huginn(FIXTURE).state_dict()
    assert got.keys() == want.keys() and len(want) > 0
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_unknown_config_key_is_named(fixture_copy):
    _edit_config(fixture_copy, lookup_strategy="full")
    with pytest.raises(UserError, match="lookup_strategy"):
        from_huginn(fixture_copy)


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"block_class_name": "PreNormBlock"}, "block_class_name"),
        ({"injection_type": "gate"}, "injection"),
        ({"head_dim": 32}, "head_dim"),
        ({"test_time_noise": 0.1}, "test_time_noise"),
        ({"effective_expected_depth": 7}, "effective_expected_depth"),
    ],
)
def test_unsupported_config_values_are_named(fixture_copy, changes, key):
    _edit_config(fixture_copy, **changes)
    with pytest.raises(UserError, match=key):
        from_huginn(fixture_copy)


def test_unknown_tensor_is_named(fixture_copy):
    _edit_tensors(fixture_copy, lambda t: t.update({"transformer.core_block.0.attn.extra_scale": torch.ones(4)}))
    with pytest.raises(UserError, match="transformer.core_block.0.attn.extra_scale"):
        from_huginn(fixture_copy)


def test_missing_tensor_is_named(fixture_copy):
    _edit_tensors(fixture_copy, lambda t: t.pop("transformer.coda.0.norm_3.weight"))
    with pytest.raises(UserError, match="transformer.coda.0.norm_3.weight"):
        from_huginn(fixture_copy)


def test_wrong_shape_is_named(fixture_copy):
    _edit_tensors(fixture_copy, lambda t: t.update({"transformer.adapter.weight": torch.zeros(64, 64)}))
    with pytest.raises(UserError, match="transformer.adapter.weight"):
        from_huginn(fixture_copy)


def test_untied_head_with_tied_config_is_an_error(fixture_copy):
    _edit_tensors(fixture_copy, lambda t: t.update({"lm_head.weight": torch.zeros(256, 64)}))
    with pytest.raises(UserError, match="lm_head.weight"):
        from_huginn(fixture_copy)


def test_missing_folder_pieces(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        from_huginn(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    with pytest.raises(UserError, match="model.safetensors"):
        from_huginn(tmp_path)


def test_real_config_builds_on_meta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    model = from_huginn(tmp_path, device="meta")
    assert isinstance(model, RecurrentGPT)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 3_564_976_800
    imported, registry = model.config.to_dict(), ModelConfig.from_name("nebel-raven-3.5b").to_dict()
    imported.pop("name"), registry.pop("name")
    assert imported == registry


def test_config_mapping_round_trips():
    from recpre.interop.huginn import model_config_to_huginn_config

    config = huginn_config_to_model_config(REAL_CONFIG, name="nebel-raven-3.5b")
    assert huginn_config_to_model_config(model_config_to_huginn_config(config), name=config.name) == config


def test_only_huginn_shaped_models_export(tmp_path):
    gpt = build_model(ModelConfig.from_name("debug-gpt"), device="meta")
    with pytest.raises(UserError, match="architecture=gpt"):
        to_huginn(gpt, tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_imported_model_trains():
    model = from_huginn(FIXTURE)
    ids = load_file(FIXTURE / "expected.safetensors")["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(ids[:, :-1], ids[:, 1:], num_steps=(1, 2)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
