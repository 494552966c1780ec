"""Generation: cached == uncached greedy decoding, batched prompts, sampling filters, stops, adaptive depth."""

import pytest
import torch

from recpre.config import ModelConfig
from recpre.generation import (
    AdaptiveDepth,
    RecurrentKVCache,
    filter_logits,
    forward_last,
    generate,
    generate_with_info,
    sample_next,
)
from recpre.model import build_model

SMALL = {
    "n_embd": 32,
    "n_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 60,
    "padding_multiple": 16,
    "block_size": 64,
}


def tiny(arch: str, **overrides):
    name = "debug-recurrent" if arch == "recurrent" else "debug-gpt"
    extra = {"state_init": "zero", "mean_recurrence": 3} if arch == "recurrent" else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name(name, **{**SMALL, **extra, **overrides}))
    return model.eval()


def prompts(vocab: int, lengths=(7, 7), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_cached_greedy_equals_uncached(arch):
    model = tiny(arch)
    ids = torch.tensor(prompts(60, (9, 9, 9)))
    cached = generate(model, ids, max_new_tokens=12, use_cache=True, eos_id=-1)
    uncached = generate(model, ids, max_new_tokens=12, use_cache=False, eos_id=-1)
    assert cached.shape == (3, 21)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :9], ids)


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_uncached_matches_argmax_of_full_forward(arch):
    """Greedy decoding written out with nothing but model.forward."""
    model = tiny(arch)
    ids = torch.tensor(prompts(60, (5,)))
    ours = generate(model, ids, max_new_tokens=6, eos_id=-1)
    ref = ids
    for _ in range(6):
        logits = model(ref).logits[:, -1, : model.config.vocab_size]
        ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
def test_forward_last_matches_model_forward(arch):
    model = tiny(arch)
    ids = torch.tensor(prompts(60, (11, 11)))
    pos = torch.arange(11).expand(2, 11)
    logits, _ = forward_last(model, ids, positions=pos, num_steps=3)
    torch.testing.assert_close(logits, model(ids, num_steps=3).logits[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "recurrent"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_of_different_lengths_equal_one_by_one(arch, use_cache):
    model = tiny(arch)
    rows = prompts(60, (3, 8, 5))
    out = generate_with_info(model, rows, max_new_tokens=7, use_cache=use_cache, eos_id=-1, pad_id=0)
    assert out.prompt_lengths == [3, 8, 5]
    for b, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), max_new_tokens=7, use_cache=True, eos_id=-1)
        assert out.new_tokens[b] == alone[0, len(row) :].tolist()
        assert out.sequences[b, 8 - len(row) : 8].tolist() == row  # left padded


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # cumulative mass ~[0.56, 0.77, 0.90, 0.97, 1.0]
    kept = filter_logits(logits, top_p=0.8).isfinite()[0]
    # the smallest set of best tokens whose mass reaches 0.8
    assert kept.tolist() == [True, True, True, False, False] and probs[:2].sum() < 0.8 <= probs[:3].sum()
    assert filter_logits(logits, top_p=0.7).isfinite().sum() == 2
    assert filter_logits(logits, top_p=1e-6).isfinite().sum() == 1  # always keeps the best one


def test_sampling_respects_top_k_top_p_and_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    topk = logits.topk(5, dim=-1).indices
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        tok = sample_next(logits, temperature=1.5, top_k=5, generator=gen)
        assert (topk == tok[:, None]).any(-1).all()
    # top-p 0.3 at low temperature: never a token outside the nucleus
    scaled = logits / 0.5
    nucleus = filter_logits(scaled, top_p=0.3).isfinite()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        tok = sample_next(logits, temperature=0.5, top_p=0.3, generator=gen)
        assert nucleus.gather(1, tok[:, None]).all()
    model = tiny("gpt")
    ids = torch.tensor(prompts(60, (4, 4)))
    a = generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=10, seed=3, eos_id=-1)
    b = generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=10, seed=3, eos_id=-1)
    c = generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=10, seed=4, eos_id=-1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 4:] < 60).all()  # never a padded vocabulary row


def test_eos_and_stop_strings_end_rows():
    model = tiny("gpt")
    ids = torch.tensor(prompts(60, (6, 6)))
    free = generate_with_info(model, ids, max_new_tokens=8, eos_id=-1)
    first = free.new_tokens[0][2]
    out = generate_with_info(model, ids, max_new_tokens=8, eos_id=first, pad_id=0)
    cut = free.new_tokens[0].index(first) + 1
    assert out.new_tokens[0] == free.new_tokens[0][:cut]
    assert out.sequences[0, 6 + cut :].eq(0).all()

    def decode(tokens):
        return " ".join(map(str, tokens))

    target = str(free.new_tokens[1][3])
    out = generate_with_info(model, ids, max_new_tokens=8, eos_id=-1, stop=[target], decode=decode)
    assert target in decode(out.new_tokens[1]) and target not in decode(out.new_tokens[1][:-1])


def test_adaptive_depth_zero_threshold_is_fixed_depth_and_reports_depth():
    model = tiny("recurrent", mean_recurrence=4)
    ids = torch.tensor(prompts(60, (6, 6)))
    fixed = generate(model, ids, max_new_tokens=6, num_steps=4, eos_id=-1)
    for criterion in ("kl", "latent-diff"):
        out = generate_with_info(
            model, ids, max_new_tokens=6, num_steps=4, eos_id=-1, adaptive=AdaptiveDepth(0.0, criterion)
        )
        assert torch.equal(out.sequences, fixed)
        assert out.mean_depth == 4.0


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_adaptive_depth_stops_early_and_is_batch_independent(criterion):
    model = tiny("recurrent", mean_recurrence=8)
    rows = prompts(60, (5, 9, 7), seed=4)
    # a threshold between typical successive changes, so rows stop at different depths
    rule = AdaptiveDepth(threshold=0.05 if criterion == "kl" else 0.3, criterion=criterion, min_steps=2)
    out = generate_with_info(model, rows, max_new_tokens=8, num_steps=8, eos_id=-1, adaptive=rule)
    flat = [d for row in out.depths for d in row]
    assert all(2 <= d <= 8 for d in flat)
    assert out.mean_depth < 8
    for b, row in enumerate(rows):
        alone = generate_with_info(model, [row], max_new_tokens=8, num_steps=8, eos_id=-1, adaptive=rule)
        assert alone.new_tokens[0] == out.new_tokens[b]
        assert alone.depths[0] == out.depths[b]


def test_bounded_cache_shares_slots_across_steps():
    model = tiny("recurrent", mean_recurrence=6)
    ids = torch.tensor(prompts(60, (6, 6)))
    full = generate(model, ids, max_new_tokens=6, num_steps=6, eos_id=-1)
    assert torch.equal(full, generate(model, ids, max_new_tokens=6, num_steps=6, eos_id=-1, share_every=6))
    cache = RecurrentKVCache.for_config(model.config, share_every=2)
    pos = torch.arange(6).expand(2, 6)
    forward_last(model, ids, positions=pos, cache=cache, num_steps=6)
    assert cache.core_slots() == 2 and len(cache) == 6
    forward_last(model, ids[:, :1], positions=pos[:, :1] + 6, cache=cache, num_steps=6)
    assert cache.core_slots() == 2 and all(k.shape[-2] == 7 for k in cache.keys.values())
    # Sharing changes what the core attends to: with longer prompts the greedy tokens differ from the full
    # cache's, and they are exactly those of greedy decoding by hand through one shared cache.
    ids = torch.tensor(prompts(60, (20, 20)))
    pos = torch.arange(20).expand(2, 20)
    full = generate(model, ids, max_new_tokens=12, num_steps=6, eos_id=-1)
    shared = generate(model, ids, max_new_tokens=12, num_steps=6, eos_id=-1, share_every=2)
    assert not torch.equal(shared, full)
    by_hand, cache = ids.clone(), RecurrentKVCache.for_config(model.config, share_every=2)
    step_ids, step_pos = ids, pos
    for _ in range(12):
        logits, _ = forward_last(model, step_ids, positions=step_pos, cache=cache, num_steps=6)
        step_ids = logits.argmax(-1, keepdim=True)
        step_pos = step_pos[:, -1:] + 1
        by_hand = torch.cat([by_hand, step_ids], dim=1)
    assert torch.equal(shared, by_hand)
    assert cache.core_slots() == 2


def test_adaptive_depth_refused_where_it_cannot_apply():
    from recpre.errors import UserError

    with pytest.raises(UserError):
        generate(tiny("gpt"), torch.tensor([[3, 4]]), max_new_tokens=2, adaptive=AdaptiveDepth())
    with pytest.raises(UserError):
        generate(tiny("recurrent"), torch.tensor([[3, 4]]), max_new_tokens=2, adaptive=AdaptiveDepth(), use_cache=False)
