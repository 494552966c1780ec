"""LoRA through peft on recpre's own model: target names, what is trainable, per-iteration core adapters (with
activation checkpointing), merging, and that weight-decay groups and initialisation see through peft's renaming."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.lora import (
    apply_lora,
    base_hash,
    lora_layers,
    merged_state_dict,
    trainable_line,
)
from recpre.lora_targets import resolve_targets, valid_targets
from recpre.model import build_model
from recpre.optim import param_groups
from recpre.settings import load_settings


def lora(**kw) -> SimpleNamespace:
    base = dict(rank=4, alpha=8.0, dropout=0.0, targets=["all"], per_iteration=0, quantize=None)
    return SimpleNamespace(**{**base, **kw})


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = dict(n_embd=32, n_heads=2, intermediate_size=64, block_size=16, state_init="zero", **overrides)
    return build_model(ModelConfig.from_name("debug-recurrent", **fields))


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """peft starts B at zero (the model's function unchanged); tests need adapters that do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_unknown_target_names_are_refused_in_one_sentence_listing_the_valid_ones():
    with pytest.raises(UserError) as err:
        load_settings(None, ["model.lora.rank=8", "model.lora.targets=[core.atn]"])
    message = str(err.value)
    assert "'core.atn'" in message and "core.attn, core.attn.Wqkv" in message and message.count(". ") == 0
    for name in valid_targets():
        assert name in message
    load_settings(None, ["model.lora.rank=8", "model.lora.targets=[prelude.attn,core.mlp.fc,coda]"])


def test_targets_select_the_attention_and_mlp_projections_of_each_stage_separately():
    names = [n for n, _ in tiny().named_modules()]
    assert resolve_targets(["core.attn"], names) == [
        "transformer.core_block.0.attn.Wqkv",
        "transformer.core_block.0.attn.proj",
        "transformer.core_block.1.attn.Wqkv",
        "transformer.core_block.1.attn.proj",
    ]
    assert resolve_targets(["coda.mlp.proj", "prelude.mlp"], names) == [
        "transformer.prelude.0.mlp.fc",
        "transformer.prelude.0.mlp.proj",
        "transformer.coda.0.mlp.proj",
    ]
    assert len(resolve_targets(["all"], names)) == 4 * 4 and resolve_targets(["injection"], names) == [
        "transformer.adapter"
    ]
    with pytest.raises(UserError, match="selects no layer"):
        resolve_targets(["blocks.attn"], names)  # a GPT's stage on a recurrent model
    with pytest.raises(UserError, match="selects no core layer"):
        apply_lora(tiny(), lora(targets=["coda"], per_iteration=2))


def test_only_adapters_train_and_rank_8_on_every_projection_of_the_debug_model_is_under_6_percent():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("debug-recurrent"))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    apply_lora(model, lora(rank=8, alpha=16.0))
    line = trainable_line(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count / total < 0.06
    assert line == f"trainable {100 * count / total:.2f}% ({count:,} of {total:,} params)"
    # the model class and the base's names stay recpre's; the base's tensors are untouched
    assert type(model).__name__ == "RecurrentGPT"
    state = model.state_dict()
    assert torch.equal(state["transformer.core_block.0.attn.Wqkv.base_layer.weight"], before[
        "transformer.core_block.0.attn.Wqkv.weight"
    ])  # fmt: skip
    assert torch.equal(state["transformer.wte.weight"], before["transformer.wte.weight"])


def test_weight_decay_groups_and_init_see_through_peft_renaming():
    model = tiny()
    apply_lora(model, lora())
    for p in model.parameters():  # train everything: the base's renamed weights must group as before
        p.requires_grad_(True)
    groups = {
        g["group"]: g["params"] for g in param_groups(model, 0.1, ["norm", "bias", "embedding", "attn.proj.weight"])
    }
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = {by_id[id(p)] for p in groups["no_decay"]}
    assert "transformer.core_block.0.attn.proj.base_layer.weight" in no_decay  # matched by its plain name
    assert "transformer.core_block.0.attn.qk_bias" in no_decay
    decay = {by_id[id(p)] for p in groups["decay"]}
    assert "transformer.core_block.0.attn.proj.lora_A.default.weight" in decay
    assert "transformer.core_block.0.attn.Wqkv.base_layer.weight" in decay
    # init: an output projection under peft's name draws with the output projection's std
    config = model.config
    wrapped = torch.empty(4096, 32)
    model.init_parameter("transformer.core_block.0.attn.proj.base_layer.weight", wrapped)
    assert abs(wrapped.std().item() - config.out_proj_std) < 0.1 * config.out_proj_std
    assert abs(wrapped.std().item() - config.init_std) > 0.2 * config.init_std


def test_merged_and_unmerged_models_give_the_same_logits():
    model = tiny()
    apply_lora(model, lora(targets=["all", "injection"]))
    randomize_adapters(model)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        unmerged = model(ids, num_steps=3).logits
        base_only = tiny().eval()(ids, num_steps=3).logits
    assert (unmerged - base_only).abs().max() > 1e-3  # the adapters change the function
    weights = merged_state_dict(model)
    merged = tiny()
    merged.load_state_dict(weights, strict=True)
    with torch.no_grad():
        out = merged.eval()(ids, num_steps=3).logits
    torch.testing.assert_close(out, unmerged, atol=1e-5, rtol=1e-5)


def test_the_base_hash_ignores_adapters_and_sees_any_change_of_the_base():
    model = tiny()
    before = base_hash(model)
    apply_lora(model, lora())
    randomize_adapters(model)
    assert base_hash(model) == before
    with torch.no_grad():
        model.transformer.coda[0].mlp.fc.base_layer.weight[0, 0] += 1e-3
    assert base_hash(model) != before


def _core_grads(model, ids, steps) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    model(ids, ids, num_steps=steps).loss.backward()
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name and "core_block" in name:
            adapter = name.split(".lora_")[1].split(".")[1]
            out[adapter] = out.get(adapter, 0.0) + (0.0 if p.grad is None else p.grad.abs().sum().item())
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_iteration_of_the_core_trains_its_own_adapter(checkpointing):
    model = tiny(activation_checkpointing=checkpointing)
    apply_lora(model, lora(targets=["core"], per_iteration=3))
    assert {tuple(layer.lora_A.keys()) for layer in lora_layers(model)} == {("iter0", "iter1", "iter2")}
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(4))
    grads = _core_grads(model, ids, (0, 4))  # iterations 0, 1, 2 and 3 (3 uses the last adapter, iter2)
    assert set(grads) == {"iter0", "iter1", "iter2"} and all(g > 0 for g in grads.values()), grads
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    shallow = _core_grads(model, ids, (0, 2))  # two iterations: iter2 is not used
    assert shallow["iter0"] > 0 and shallow["iter1"] > 0 and shallow["iter2"] == 0
    if checkpointing:  # the recomputation in backward uses each iteration's adapter again: gradients are exact
        plain = tiny()
        apply_lora(plain, lora(targets=["core"], per_iteration=3))
        randomize_adapters(plain)
        plain.train()
        assert _core_grads(plain, ids, (0, 4)) == pytest.approx(grads, rel=1e-5)


def test_per_iteration_adapters_differ_in_effect_and_cannot_be_merged():
    model = tiny()
    apply_lora(model, lora(targets=["core"], per_iteration=2))
    randomize_adapters(model)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        before = model(ids, num_steps=3).logits
        for layer in lora_layers(model):  # swap the two iterations' adapters
            a, b = layer.lora_B["iter0"].weight, layer.lora_B["iter1"].weight
            a_copy = a.clone()
            a.copy_(b)
            b.copy_(a_copy)
        swapped = model(ids, num_steps=3).logits
    assert (before - swapped).abs().max() > 1e-4
    with pytest.raises(UserError, match="cannot be merged into one shared weight"):
        merged_state_dict(model)
