"""Tokenizer: exact round trip, special ids, loading errors, vocab check."""

from __future__ import annotations

import pytest

from recpre.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from recpre.errors import UserError

TEXTS = [
    "def f(x):\n    return x + 1\n\n\n",
    "  leading spaces, trailing tabs\t\t\n",
    "unicode: héllo wörld, 日本語, emoji 🙂, combining é, zero-width \u200b.",
    "\r\nwindows\r\nnewlines\r\n",
    "",
    " ",
    "<|eos|> looks special but is plain text here",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 50] * 5
    return train_tokenizer(corpus, 300, tmp_path_factory.mktemp("tok"))


def test_round_trip_exact(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    batch = tokenizer.encode_batch(TEXTS)
    assert [tokenizer.decode(ids) for ids in batch] == TEXTS


def test_special_ids_and_reload(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size <= 300
    again = load_tokenizer(tokenizer.path.parent)
    assert again.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    assert again.vocab_size == tokenizer.vocab_size
    # encode adds no special tokens, and the literal text of a special token is not turned into its id
    assert tokenizer.eos_id not in tokenizer.encode("hello")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=str(bad / "tokenizer.json")):
        load_tokenizer(bad)


def test_check_vocab():
    check_vocab(4096, 4096)
    check_vocab(4000, 4096)
    with pytest.raises(UserError, match="65536.*vocab_size is 4096"):
        check_vocab(65536, 4096, source="tok/tokenizer.json")


def test_too_small_vocab(tmp_path):
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer(["abc"], 100, tmp_path)
