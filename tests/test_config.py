"""ModelConfig and the registry: sizes match the reference table, bad input is a UserError naming the key."""

import math

import pytest

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.model_registry import MODELS, names

# REFERENCE.md section 1, with the precision the table gives: (name, params, decimals of the unit).
REFERENCE_SIZES = [
    ("magpie-150m", 157.2e6, 0.05e6),
    ("corax-raven-800m", 939.6e6, 0.05e6),
    ("kolk-raven-1.1b", 1.275e9, 0.0005e9),
    ("tower-raven-3b", 2.28e9, 0.005e9),
]


def test_nebel_raven_exact_count():
    c = ModelConfig.from_name("nebel-raven-3.5b")
    assert c.num_params() == 3_564_976_800
    assert c.n_layers_core * c.block_params() == 1_581_592_320  # "recurrent block" in the reference
    assert c.adapter_params() == 2 * 5280 * 5280  # the 55.8M adapter
    assert c.head_dim == 96 and c.effective_depth == 132
    assert (c.bos_id, c.eos_id, c.pad_id) == (65504, 65505, 65509)


@pytest.mark.parametrize("name,params,tol", REFERENCE_SIZES)
def test_reference_sizes(name, params, tol):
    assert abs(ModelConfig.from_name(name).num_params() - params) <= tol


def test_registry_has_required_shapes():
    for required in ("debug-recurrent", "debug-gpt", "huginn-tiny", "gpt2-124m-like", "llama-1b", "nebel-raven-3.5b"):
        assert required in names()
    debug = ModelConfig.from_name("debug-recurrent")
    assert debug.vocab_size == 4096 and debug.padded_vocab_size == 4096 and debug.block_size == 256


def test_padded_vocab_and_head_dim():
    c = ModelConfig.from_name("gpt2-124m-like")
    assert c.padded_vocab_size == 50304 and c.padded_vocab_size % 64 == 0
    assert c.head_dim == 64
    assert ModelConfig.from_name("debug-gpt", vocab_size=4000, padding_multiple=128).padded_vocab_size == 4096


def test_round_trip_dict():
    for name in names():
        c = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(c.to_dict()) == c


def test_flops_per_token():
    c = ModelConfig.from_name("nebel-raven-3.5b")
    # Inference at depth r: ~2 x (params applied) + attention; grows linearly in r.
    f8, f16 = c.flops_per_token(8, training=False), c.flops_per_token(16, training=False)
    step = f16 - f8
    per_step = 2 * c.n_layers_core * (c.block_params() - 4 * c.n_embd) + 2 * c.adapter_params()
    assert step / 8 == pytest.approx(per_step + c.n_layers_core * 4 * c.block_size * c.n_embd, rel=1e-6)
    # Training (n no-grad, k grad) = forward of everything + backward of the grad part.
    assert c.flops_per_token((24, 8)) > c.flops_per_token(32, training=False)
    assert c.flops_per_token((24, 8)) < 3 * c.flops_per_token(32, training=False)
    g = ModelConfig.from_name("gpt2-124m-like")
    non_emb = g.num_params() - g.padded_vocab_size * g.n_embd
    approx_6n = 6 * (non_emb + g.padded_vocab_size * g.n_embd)
    assert g.flops_per_token() == pytest.approx(approx_6n + 3 * g.n_layers * 4 * g.block_size * g.n_embd, rel=0.01)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="nebel-raven-3.5b"):
        ModelConfig.from_name("nebel-raven-3b")


def test_unknown_override_names_field():
    with pytest.raises(UserError, match="n_embed") as err:
        ModelConfig.from_name("debug-gpt", n_embed=64)
    assert "n_embd" in str(err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"n_embd": 130}, "n_embd"),
        ({"block_kind": "middle"}, "block_kind"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"mean_recurrence": 0}, "mean_recurrence"),
        ({"injection": "gate"}, "injection"),
        ({"n_embd": 96, "n_heads": 32}, "n_heads"),  # head_dim 3: RoPE needs pairs
        ({"fused_head": "fast"}, "fused_head"),
    ],
)
def test_impossible_values(overrides, key):
    with pytest.raises(UserError, match=key):
        ModelConfig.from_name("debug-recurrent", **overrides)


def test_gqa_with_qk_bias_rejected():
    with pytest.raises(UserError, match="qk_bias"):
        ModelConfig.from_name("debug-recurrent", n_kv_heads=2)
    assert ModelConfig.from_name("debug-recurrent", n_kv_heads=2, qk_bias=False).kv_heads == 2


def test_registry_entries_are_valid_fields():
    for name, fields in MODELS.items():
        c = ModelConfig.from_name(name)
        assert c.name == name
        assert all(hasattr(c, k) for k in fields)
        assert math.isfinite(c.flops_per_token())


def test_types_are_checked_and_yaml_numbers_coerced():
    c = ModelConfig.from_name("debug-recurrent", norm_eps="1e-5", rope_base=10000)
    assert c.norm_eps == 1e-5 and isinstance(c.rope_base, float)
    for key, value in (("n_embd", "128"), ("qk_bias", "yes"), ("n_layers_core", 2.0), ("block_size", True)):
        with pytest.raises(UserError, match=key):
            ModelConfig.from_name("debug-recurrent", **{key: value})


def test_a_recurrent_model_without_backprop_depth_is_refused():
    """k = 0 on every draw would leave prelude, adapter and core without gradients: never trained."""
    with pytest.raises(UserError, match="mean_backprop_depth"):
        ModelConfig.from_name("debug-recurrent", mean_backprop_depth=0)
    ModelConfig.from_name("debug-recurrent", mean_backprop_depth=0, sampling_scheme="non-recurrent")
