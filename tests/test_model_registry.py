"""Huginn's registry shapes equal the reference registry entry by entry; the reference's orthogonal init.

REFERENCE below is transcribed from recpre/model_registry.py of github.com/seal-rg/recurrent-pretraining at commit
59e0b69b2d96a59cbbe79c9d5034d89ecb5ab6f6, with the defaults of its recpre/config_dynamic.py (`Config`:
qk_bias False, bias False; `RoPESettings.rope_base` 50000) and recpre/init.py (`"scaled"`: std sqrt(2/(5h)),
out_proj std / sqrt(2 * effective depth), no embed_scale, i.e. 1; `init_orthogonal` draws truncated orthogonal
matrices). Reference names map to ours: TransformerPostNormBlock -> "post", SandwichBlock -> "sandwich",
injection_type -> injection, n_layers_in_recurrent_block -> n_layers_core, num_attention_heads -> n_heads,
init "scaled" + init_orthogonal -> "scaled-orthogonal" (recpre's own "scaled" is the 0.02 GPT init).
"""

import math

import pytest
import torch

from recpre.config import ModelConfig
from recpre.model import build_model

_SMALL = dict(
    block_kind="post", norm_eps=1e-5, init_strategy="scaled-orthogonal", embedding_scale=1.0,
    injection="add", sampling_scheme="poisson-fill", qk_bias=False,
)  # fmt: skip
_ALL = dict(block_size=4096, vocab_size=65536, padding_multiple=4096, tie_embeddings=True, bias=False,
            state_init="like-init", rope_base=50000.0, architecture="recurrent")  # fmt: skip

# name: (n_embd, heads, kv heads, intermediate, prelude, core, coda, mean recurrence, backprop depth) + recipe
REFERENCE = {
    "magpie-150m": ((1024, 32, 32, 3520, 1, 4, 1, 20, 4), _SMALL),
    "corax-raven-800m": ((4096, 32, 32, 8192, 1, 2, 1, 20, 4), _SMALL),
    "kolk-raven-1.1b": ((4096, 64, 64, 8192, 1, 4, 1, 24, 8), _SMALL),
    "tower-raven-3b": ((4096, 64, 64, 8192, 2, 8, 2, 32, 8), _SMALL),
    "nebel-raven-3.5b": (
        (5280, 55, 55, 17920, 2, 4, 2, 32, 8),
        dict(
            block_kind="sandwich",
            norm_eps=1e-6,
            init_strategy="takase",
            embedding_scale=None,
            injection="linear",
            sampling_scheme="poisson-lognormal-filling",
            qk_bias=True,
        ),
    ),  # fmt: skip
}
SHAPE_FIELDS = (
    "n_embd", "n_heads", "kv_heads", "intermediate_size", "n_layers_prelude", "n_layers_core", "n_layers_coda",
    "mean_recurrence", "mean_backprop_depth",
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_registry_entry_equals_the_reference(name):
    shape, recipe = REFERENCE[name]
    config = ModelConfig.from_name(name)
    assert tuple(getattr(config, f) for f in SHAPE_FIELDS) == shape
    for key, value in {**_ALL, **recipe}.items():
        assert getattr(config, key) == value, key
    expected_scale = math.sqrt(config.n_embd) if recipe["init_strategy"] == "takase" else 1.0
    assert config.emb_scale == expected_scale
    assert config.init_std == pytest.approx(math.sqrt(2 / (5 * config.n_embd)))


def test_scaled_orthogonal_init_draws_orthogonal_parts_at_the_reference_scale():
    config = ModelConfig.from_name("magpie-150m", n_embd=64, n_heads=4, intermediate_size=96, vocab_size=512,
                                   padding_multiple=64, block_size=32, mean_recurrence=4, mean_backprop_depth=2,
                                   bos_id=None, eos_id=None, pad_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config)
    params = dict(model.named_parameters())
    d, std = config.n_embd, config.init_std

    def orthogonal(w: torch.Tensor, gain: float) -> bool:
        w = w / gain
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return torch.allclose(small, torch.eye(small.shape[0]), atol=1e-5)

    q, k, v = params["transformer.core_block.0.attn.Wqkv.weight"].split(d, dim=0)
    for part in (q, k, v):
        assert orthogonal(part, std * math.sqrt(d))
    gate, up = params["transformer.core_block.0.mlp.fc.weight"].split(96, dim=0)
    assert orthogonal(gate, std * math.sqrt(96)) and orthogonal(up, std * math.sqrt(96))
    assert orthogonal(params["transformer.coda.0.mlp.proj.weight"], config.out_proj_std * math.sqrt(96))
    assert orthogonal(params["transformer.prelude.0.attn.proj.weight"], config.out_proj_std * math.sqrt(d))
    assert orthogonal(params["transformer.wte.weight"], std * math.sqrt(512))
    # entries have the init std (an orthogonal matrix's rows are unit vectors: entries ~ 1/sqrt(max dim))
    assert params["transformer.wte.weight"].std().item() == pytest.approx(std, rel=0.05)


def test_scaled_orthogonal_init_of_a_sharded_parameter_is_the_whole_matrix(tmp_path):
    """A DTensor parameter (FSDP2) is drawn whole, then re-sharded: its full value is orthogonal."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from recpre.model import _init_whole, _orthogonal_parts_

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(8, 16, bias=False)
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        assert hasattr(layer.weight, "full_tensor")
        with torch.no_grad():
            _init_whole(layer.weight, lambda t: _orthogonal_parts_(t, [16], 1 / math.sqrt(16)))
        full = layer.weight.full_tensor()
        torch.testing.assert_close(full.T @ full, torch.eye(8), atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()
