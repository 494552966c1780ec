"""GPT and RecurrentGPT: truncated backprop, depth sampler, init, overfitting, sizes, backends, KV cache."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recpre.config import ModelConfig
from recpre.model import KVCache, ModelOutput, build_model, compile_blocks
from recpre.model_registry import names
from recpre.recurrence import sample_depth

SMALL = {
    "n_embd": 32,
    "n_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
    "padding_multiple": 16,
    "block_size": 32,
    "attention": "eager",
}


def tiny(arch: str = "recurrent", **overrides) -> ModelConfig:
    name = "debug-recurrent" if arch == "recurrent" else "debug-gpt"
    return ModelConfig.from_name(name, **{**SMALL, **overrides})


def batch(config: ModelConfig, b: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, s + 1), generator=g)
    return ids[:, :-1].clone(), ids[:, 1:].clone()


def build(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config)


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ---- truncated backpropagation --------------------------------------------------------------------------------


def reference_loss(model, ids, labels, n: int, k: int) -> torch.Tensor:
    """The same function written out by hand: the first n iterations computed, then detached."""
    ctx = model._context(ids, None, None, None)
    e = model._embed(ids)
    for i, block in enumerate(model.transformer.prelude):
        e = block(e, ctx, ("prelude", 0, i))
    s = torch.zeros_like(e)
    for step in range(n):
        s = model.core_step(s, e, ctx, step)
    s = s.detach()
    for step in range(n, n + k):
        s = model.core_step(s, e, ctx, step)
    x = model.transformer.ln_f(s)
    for i, block in enumerate(model.transformer.coda):
        x = block(x, ctx, ("coda", 0, i))
    x = model.transformer.ln_f(x)
    logits = F.linear(x, model.transformer.wte.weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("n,k", [(3, 2), (0, 2), (2, 0), (0, 0)])
def test_grad_flows_only_through_last_k(n, k):
    config = tiny(state_init="zero")
    model = build(config)
    ids, labels = batch(config)
    model(ids, labels, num_steps=(n, k)).loss.backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    reference_loss(model, ids, labels, n, k).backward()
    ref = grads(model)
    for name in ours:
        if ref[name] is None:
            assert ours[name] is None or not ours[name].any(), name
        else:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    if k == 0:  # nothing in the loop (nor the prelude feeding it) gets a gradient
        assert ours["transformer.adapter.weight"] is None
        assert ours["transformer.prelude.0.attn.Wqkv.weight"] is None
        assert ours["transformer.coda.0.attn.Wqkv.weight"] is not None


def test_truncation_changes_gradients():
    """(n, k) = (3, 2) must differ from backpropagating through all 5 iterations (the test above is not vacuous)."""
    config = tiny(state_init="zero")
    model = build(config)
    ids, labels = batch(config)
    model(ids, labels, num_steps=(3, 2)).loss.backward()
    truncated = grads(model)["transformer.adapter.weight"]
    model.zero_grad(set_to_none=True)
    model(ids, labels, num_steps=(0, 5)).loss.backward()
    full = grads(model)["transformer.adapter.weight"]
    assert not torch.allclose(truncated, full)
    with torch.no_grad():
        assert torch.equal(model(ids, labels, num_steps=(3, 2)).loss, model(ids, labels, num_steps=(0, 5)).loss)


# ---- depth sampler --------------------------------------------------------------------------------------------


def _expected_tail(t_plus_s: float, sigma: float, threshold: int) -> float:
    """P(Poisson(LogNormal(ln(t+s) - sigma^2/2, sigma)) + 1 > threshold), by quadrature over the normal."""
    mu = math.log(t_plus_s) - sigma**2 / 2
    zs = np.linspace(-8, 8, 4001)
    weights = np.exp(-(zs**2) / 2) / math.sqrt(2 * math.pi) * (zs[1] - zs[0])
    total = 0.0
    for z, w in zip(zs, weights):
        lam = math.exp(mu + sigma * z)
        cdf = sum(math.exp(-lam + j * math.log(lam) - math.lgamma(j + 1)) for j in range(threshold))
        total += w * (1 - cdf)  # P(Poisson >= threshold) = P(r > threshold)
    return total


def test_sampler_matches_formula():
    config = ModelConfig.from_name("nebel-raven-3.5b")
    draws = np.array([sample_depth(config, step) for step in range(100_000)])
    n, k = draws[:, 0], draws[:, 1]
    r = n + k
    assert k.max() == 8 and (k == np.minimum(8, r)).all() and (n == np.maximum(r - 8, 0)).all()
    se = math.sqrt(32 + 32**2 * (math.exp(0.25) - 1)) / math.sqrt(len(r))
    assert abs(r.mean() - 33) < 5 * se  # E[r] = t + s + 1
    tail = (r > 64).mean()
    expected = _expected_tail(32, 0.5, 64)
    assert abs(expected - 0.058) < 0.002  # the reference's figure
    assert abs(tail - expected) < 5 * math.sqrt(expected * (1 - expected) / len(r))
    assert np.median(r) == 29


def test_sampler_other_schemes():
    c = ModelConfig.from_name("debug-recurrent", sampling_scheme="fixed")
    assert sample_depth(c, 5) == (2, 2)
    c = ModelConfig.from_name("debug-recurrent", sampling_scheme="non-recurrent")
    assert sample_depth(c, 5) == (0, 1)
    c = ModelConfig.from_name("debug-recurrent", sampling_scheme="poisson-fill")
    draws = np.array([sample_depth(c, i) for i in range(20_000)])
    assert (draws[:, 1] == 2).all() and abs(draws[:, 0].mean() - 2) < 0.05


def test_sampler_is_pure_and_lockstep():
    c = ModelConfig.from_name("debug-recurrent")
    assert [sample_depth(c, s, 0, 7) for s in range(50)] == [sample_depth(c, s, 0, 7) for s in range(50)]
    assert len({sample_depth(c, s) for s in range(50)}) > 1
    assert [sample_depth(c, s, seed=1) for s in range(50)] != [sample_depth(c, s, seed=2) for s in range(50)]
    for step in range(20):
        assert len({sample_depth(c, step, rank) for rank in range(8)}) == 1
    free = ModelConfig.from_name("debug-recurrent", lockstep=False)
    assert any(len({sample_depth(free, step, rank) for rank in range(8)}) > 1 for step in range(20))
    assert sample_depth(free, 3, 5, 1) == sample_depth(free, 3, 5, 1)


# ---- state, init, training ------------------------------------------------------------------------------------


def test_zero_state_is_deterministic_like_init_is_not():
    config = tiny(state_init="zero")
    model = build(config).eval()
    ids, _ = batch(config)
    with torch.no_grad():
        assert torch.equal(model(ids, num_steps=3).logits, model(ids, num_steps=3).logits)
        model.config.state_init = "like-init"
        assert not torch.equal(model(ids, num_steps=3).logits, model(ids, num_steps=3).logits)


@pytest.mark.parametrize("name", ["debug-recurrent", "debug-gpt"])
def test_initial_loss_is_log_vocab(name):
    config = ModelConfig.from_name(name, attention="eager")
    model = build(config)
    ids, labels = batch(config, b=2, s=64)
    with torch.no_grad():
        loss = model(ids, labels).loss.item()
    assert abs(loss - math.log(config.vocab_size)) < 0.5


def test_build_is_deterministic_and_meta_is_free():
    config = tiny()
    a, b = build(config, seed=3).state_dict(), build(config, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    big = build_model(ModelConfig.from_name("nebel-raven-3.5b"), device="meta")
    assert all(p.is_meta for p in big.parameters())


def test_takase_init_scales():
    config = ModelConfig.from_name("debug-recurrent", n_embd=256, intermediate_size=512)
    model = build(config)
    wqkv = model.transformer.core_block[0].attn.Wqkv.weight
    proj = model.transformer.core_block[0].mlp.proj.weight
    assert wqkv.std().item() == pytest.approx(config.init_std, rel=0.05)
    assert proj.std().item() == pytest.approx(config.init_std / math.sqrt(2 * config.effective_depth), rel=0.05)
    assert wqkv.abs().max() <= 3 * config.init_std
    assert torch.equal(model.transformer.core_block[0].norm_2.weight, torch.ones(256))


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_overfits_one_batch(arch):
    config = tiny(arch)
    model = build(config)
    ids, labels = batch(config, b=2, s=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        num_steps = sample_depth(config, step) if arch == "recurrent" else None
        loss = model(ids, labels, num_steps=num_steps).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    model.eval()
    with torch.no_grad():
        assert model(ids, labels).loss.item() < 0.1


# ---- loss head ------------------------------------------------------------------------------------------------


def test_loss_ignores_padding_and_uses_normalizer():
    config = tiny(state_init="zero")
    model = build(config)
    ids, labels = batch(config)
    labels = labels.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = model(ids, labels, num_steps=2)
        logits = model(ids, num_steps=2).logits
    assert isinstance(out, ModelOutput) and out.logits is None
    assert logits.shape == (2, 16, config.padded_vocab_size) and logits.dtype == torch.float32
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(out.loss, per_token.sum() / 27)
    with torch.no_grad():
        scaled = model(ids, labels, num_steps=2, loss_normalizer=100.0).loss
        scaled_t = model(ids, labels, num_steps=2, loss_normalizer=torch.tensor(100.0)).loss
        empty = model(ids, torch.full_like(labels, -100), num_steps=2).loss
    torch.testing.assert_close(scaled, per_token.sum() / 100)
    torch.testing.assert_close(scaled_t, scaled)
    assert empty.item() == 0.0


def test_chunked_head_matches_plain():
    from recpre import ops

    assert hasattr(ops, "fused_linear_cross_entropy")
    config = tiny(state_init="zero")
    model = build(config)
    ids, labels = batch(config)
    labels[1, 3:9] = -100
    plain = model(ids, labels, num_steps=(1, 2)).loss
    plain.backward()
    g_plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.config.fused_head = "chunked"
    fused = model(ids, labels, num_steps=(1, 2)).loss
    fused.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        fused_sum = model(ids, labels, num_steps=(1, 2), loss_normalizer=50.0).loss
        model.config.fused_head = "none"
        plain_sum = model(ids, labels, num_steps=(1, 2), loss_normalizer=50.0).loss
    torch.testing.assert_close(fused_sum, plain_sum, rtol=1e-5, atol=1e-6)


# ---- sizes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", names())
def test_param_count_matches_formula(name):
    config = ModelConfig.from_name(name)
    device = "cpu" if config.num_params() < 5e6 else "meta"
    model = build_model(config, device=device)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


@pytest.mark.parametrize("overrides", [{"tie_embeddings": False, "bias": True}, {"qk_bias": False, "n_kv_heads": 2}])
@pytest.mark.parametrize("kind", ["pre", "post", "sandwich"])
def test_param_count_variants(overrides, kind):
    for arch in ("gpt", "recurrent"):
        config = tiny(arch, block_kind=kind, **overrides)
        assert sum(p.numel() for p in build(config).parameters()) == config.num_params()


# ---- attention backends, positions, documents -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_eager_and_sdpa_agree(arch, with_docs):
    config = tiny(arch, state_init="zero", n_kv_heads=2, qk_bias=False)
    model = build(config)
    ids, labels = batch(config)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16]) if with_docs else None
    results = {}
    for backend in ("eager", "sdpa"):
        model.config.attention = backend
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels, num_steps=(1, 2), doc_ids=doc_ids).loss
        loss.backward()
        with torch.no_grad():
            logits = model(ids, num_steps=3, doc_ids=doc_ids).logits
        results[backend] = (loss.detach(), logits, grads(model))
    (l_e, z_e, g_e), (l_s, z_s, g_s) = results["eager"], results["sdpa"]
    torch.testing.assert_close(l_s, l_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_s, z_e, rtol=1e-5, atol=1e-5)
    for name in g_e:
        torch.testing.assert_close(g_s[name], g_e[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_packed_documents_equal_separate_runs(arch):
    """doc_ids + reset position_ids make a packed row compute each document as if alone."""
    config = tiny(arch, state_init="zero")
    model = build(config).eval()
    ids, _ = batch(config, b=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.tensor([list(range(7)) + list(range(9))])
    with torch.no_grad():
        packed = model(ids, num_steps=3, doc_ids=doc_ids, position_ids=positions).logits
        first = model(ids[:, :7], num_steps=3).logits
        second = model(ids[:, 7:], num_steps=3).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_loss_and_grads():
    config = tiny(state_init="zero")
    model = build(config)
    ids, labels = batch(config)
    model(ids, labels, num_steps=(1, 3)).loss.backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.config.activation_checkpointing = True
    model(ids, labels, num_steps=(1, 3)).loss.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], msg=name)


# ---- incremental decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_kv_cache_matches_full_forward(arch):
    config = tiny(arch, state_init="zero", n_kv_heads=2, qk_bias=False)
    model = build(config).eval()
    ids, _ = batch(config, b=2, s=12)
    with torch.no_grad():
        full = model(ids, num_steps=3).logits
        cache = KVCache()
        pieces = [model(ids[:, :5], num_steps=3, cache=cache).logits]
        for t in range(5, 12):
            pieces.append(model(ids[:, t : t + 1], num_steps=3, cache=cache).logits)
    assert cache.offset == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_rejects_inconsistent_depth():
    config = tiny(state_init="zero")
    model = build(config).eval()
    ids, _ = batch(config, b=1, s=6)
    cache = KVCache()
    with torch.no_grad():
        model(ids[:, :5], num_steps=2, cache=cache)
        with pytest.raises(ValueError, match="core"):
            model(ids[:, 5:], num_steps=3, cache=cache)


def test_a_batch_without_targets_has_loss_zero_not_nan():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("debug-gpt", n_embd=32, n_heads=2, intermediate_size=64))
    ids = torch.randint(0, 100, (1, 8))
    ignored = torch.full_like(ids, -100)
    assert model(ids, labels=ignored).loss.item() == 0.0
    assert model(ids, labels=ignored, loss_normalizer=0.0).loss.item() == 0.0


def test_compile_blocks_keeps_outputs_and_parameter_names():
    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent", n_embd=32, n_heads=2, intermediate_size=64, state_init="zero")
    model = build_model(config)
    ids = torch.randint(0, 100, (2, 16))
    before = model(ids, num_steps=3).logits
    names = list(model.state_dict())
    compile_blocks(model, backend="eager")
    assert list(model.state_dict()) == names  # checkpoints written by a compiled run load anywhere
    for steps in (1, 3, 5):  # every sampled depth goes through the same compiled blocks
        model(ids, num_steps=steps)
    torch.testing.assert_close(model(ids, num_steps=3).logits, before)
