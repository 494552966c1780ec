"""RecurrentKVCache: which entries stand in for recurrence steps an earlier token skipped (lookup strategies)."""

import pytest
import torch

from recpre.errors import UserError
from recpre.recurrent_cache import RecurrentKVCache, parse_lookup


def entry(value: float, tokens: int = 1) -> torch.Tensor:
    return torch.full((1, 1, tokens, 2), value)


def decode_token(cache: RecurrentKVCache, depth: int, mark: float, upto: int | None = None):
    """One token through prelude (2 blocks), `depth` iterations of a 4-block core, coda; entry values encode
    (iteration, block). Returns what the core block 0 application at iteration `upto` reads."""
    seen = None
    for i in range(cache.n_prelude):
        cache.update(("prelude", 0, i), entry(mark), entry(mark))
    for j in range(depth):
        for i in range(cache.n_core):
            k, _ = cache.update(("core", j, i), entry(mark + 10 * j + i), entry(0.0))
            if j == upto and i == 0:
                seen = k[0, 0, :, 0].tolist()
    cache.update(("coda", 0, 0), entry(mark), entry(mark))
    cache.advance(1)
    return seen


def test_latest_lends_the_deepest_iteration_up_to_this_one_of_the_same_block():
    cache = RecurrentKVCache(2, 4, "latest-m4")
    decode_token(cache, depth=5, mark=1000)  # token 0: iterations 0..4
    decode_token(cache, depth=2, mark=2000)  # token 1: iterations 0..1
    seen = decode_token(cache, depth=4, mark=3000, upto=3)  # token 2 at iteration 3 (block 0)
    assert seen == [1000 + 30, 2000 + 10, 3000 + 30]


def test_always_last_lends_the_deepest_iteration_even_beyond_this_one():
    cache = RecurrentKVCache(2, 4, "always-last-m4")
    decode_token(cache, depth=5, mark=1000)
    decode_token(cache, depth=2, mark=2000)
    seen = decode_token(cache, depth=4, mark=3000, upto=3)
    assert seen == [1000 + 40, 2000 + 10, 3000 + 30]
    full = RecurrentKVCache(2, 4, "always-last-m4")  # nothing missing: every token's own entry
    decode_token(full, depth=5, mark=1000)
    assert decode_token(full, depth=4, mark=3000, upto=3) == [1000 + 30, 3000 + 30]


@pytest.mark.parametrize("lookup", ["full", "skip"])
def test_full_and_skip_leave_missing_tokens_out(lookup):
    cache = RecurrentKVCache(2, 4, lookup)
    decode_token(cache, depth=5, mark=1000)
    decode_token(cache, depth=2, mark=2000)
    assert decode_token(cache, depth=4, mark=3000, upto=3) == [1000 + 30, 3000 + 30]
    assert cache.kept is None  # the coda: every token present


def test_randomized_draws_an_entry_the_token_has_up_to_this_iteration():
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        c = RecurrentKVCache(2, 4, "randomized")
        decode_token(c, depth=6, mark=1000)
        decode_token(c, depth=2, mark=2000)
        got = decode_token(c, depth=5, mark=3000, upto=4)
        assert got[1] in (2000.0, 2010.0) and got[0] in [1000.0 + 10 * j for j in range(5)]
        seen.add(tuple(got))
    assert len(seen) > 1


def test_compression_slots_follow_the_reference_numbering():
    P, C = 2, 4  # Huginn's prelude and core: application index of core block i at iteration j = 2 + 4 j + i
    s4, r4, anchor = (RecurrentKVCache(P, C, f"latest-m4-compress-{x}") for x in ("s4", "r4", "anchor"))
    for g in range(P, P + 60 * C):
        assert s4.slot(g) == (g - 2) % 4 + 2
        assert r4.slot(g) == (g - 2) // 4 + 2
        assert anchor.slot(g) == (g if g - 2 < 4 * 8 else 34 + (g - 34) % 4)
    assert s4.slot(1) == 1 and s4.slot(-1) == -1  # prelude and coda are never folded
    shared = RecurrentKVCache(P, C, share_every=2)
    assert [shared.slot(P + j * C) for j in range(4)] == [2, 6, 2, 6]


def test_bad_lookup_names_are_user_errors():
    assert parse_lookup("latest-m4-compress-s8") == ("latest-m4", ("s", 8))
    assert parse_lookup("compress-anchor") == (None, ("anchor", 0))
    for bad in ("latest", "latest-m4-compress-x3", "full-compress-s0"):
        with pytest.raises(UserError):
            parse_lookup(bad)
    with pytest.raises(UserError):
        RecurrentKVCache(2, 4, "latest-m4-compress-s4", share_every=2)
