"""Pipeline: sources -> packed rows (length, content, order), weights, shuffle/split, stats, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpre.data.packed import open_packed, parquet_files
from recpre.data.pipeline import tokenize_corpus
from recpre.data.shuffle import shuffle_split
from recpre.data.stats import count_tokens
from recpre.data.tokenizer import train_tokenizer
from recpre.errors import UserError

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "héllo",
    "wörld",
    "日本語",
    "def",
    "class",
    "return",
    "import\n",
    "",
    "",
    "",
    "",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) + f" #{i}\n" for i in range(n)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """One source of each kind: a text file, a jsonl file, a parquet file; docs in that order."""
    root = tmp_path_factory.mktemp("raw")
    docs = make_docs(120)
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for d in docs[1:60]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[60:]}), root / "c.parquet")
    return root, docs


@pytest.fixture(scope="module")
def tok(raw, tmp_path_factory):
    _, docs = raw
    return train_tokenizer(docs, 320, tmp_path_factory.mktemp("tok"))


def all_rows(folder) -> np.ndarray:
    return np.concatenate([open_packed(p).read_group_all() for p in parquet_files(folder)])


def test_rows_reproduce_documents_in_order(raw, tok, tmp_path):
    root, docs = raw
    out = tmp_path / "packed"
    stats = tokenize_corpus([root / "a.txt", root / "b.jsonl", root / "c.parquet"], tok, 16, out, rows_per_shard=64)
    rows = all_rows(out)
    assert rows.shape[1] == 17
    assert len(parquet_files(out)) > 1  # several shards
    assert stats.num_rows == len(rows) and stats.num_documents == len(docs)
    flat = rows.reshape(-1).tolist()
    # strip the padding of the last row, then split at EOS: exactly the documents, in order
    while flat and flat[-1] == tok.pad_id:
        flat.pop()
    assert flat[-1] == tok.eos_id
    pieces, cur = [], []
    for t in flat:
        if t == tok.eos_id:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert pieces == docs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == len(rows) and manifest["block_size"] == 16
    meta = open_packed(parquet_files(out)[0]).meta
    assert meta["eos_id"] == tok.eos_id and meta["pad_id"] == tok.pad_id and meta["block_size"] == 16


def test_folder_source_and_weights(raw, tok, tmp_path):
    root, docs = raw
    s1 = tokenize_corpus([root], tok, 32, tmp_path / "one")
    assert s1.num_documents == len(docs)
    s2 = tokenize_corpus([root, root / "a.txt"], tok, 32, tmp_path / "two", weights=[0.5, 3])
    assert s2.sources[1]["documents"] == 3
    assert 0.25 * len(docs) < s2.sources[0]["documents"] < 0.75 * len(docs)


def test_shuffle_split_is_a_permutation(raw, tok, tmp_path):
    root, _ = raw
    tokenize_corpus([root], tok, 16, tmp_path / "packed", rows_per_shard=64)
    m = shuffle_split(tmp_path / "packed", tmp_path / "shuf", val_fraction=0.2, seed=3, rows_per_shard=64)
    before = all_rows(tmp_path / "packed")
    train, val = all_rows(tmp_path / "shuf" / "train"), all_rows(tmp_path / "shuf" / "val")
    assert len(val) == round(0.2 * len(before)) == m["val"]["rows"]
    after = np.concatenate([train, val])
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(after) == key(before)
    assert not np.array_equal(train, before[: len(train)])  # actually shuffled
    assert len(parquet_files(tmp_path / "shuf" / "train")) >= 2
    # deterministic in the seed
    shuffle_split(tmp_path / "packed", tmp_path / "shuf2", val_fraction=0.2, seed=3, rows_per_shard=64)
    assert np.array_equal(all_rows(tmp_path / "shuf2" / "train"), train)


def test_count_tokens(raw, tok, tmp_path):
    root, docs = raw
    tokenize_corpus([root], tok, 16, tmp_path / "p")
    packed, rawstats = count_tokens([tmp_path / "p", root], tok)
    assert packed["documents"] == len(docs) and packed["tokens"] == packed["rows"] * 17
    assert rawstats["documents"] == len(docs)
    assert rawstats["tokens"] + len(docs) + packed["pad_tokens"] == packed["tokens"]


def test_bad_inputs_leave_nothing(raw, tok, tmp_path):
    root, _ = raw
    with pytest.raises(UserError, match="missing.txt"):
        tokenize_corpus([tmp_path / "missing.txt"], tok, 16, tmp_path / "o1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl.*empty source"):
        tokenize_corpus([root, empty], tok, 16, tmp_path / "o2")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt.*UTF-8"):
        tokenize_corpus([root, latin], tok, 16, tmp_path / "o3")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match="bad.jsonl line 2"):
        tokenize_corpus([bad_json], tok, 16, tmp_path / "o4")
    wrong_col = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["x"]}), wrong_col)
    with pytest.raises(UserError, match="wrong.parquet.*no column 'text'"):
        tokenize_corpus([wrong_col], tok, 16, tmp_path / "o5")
    truncated = tmp_path / "trunc.parquet"
    truncated.write_bytes((root / "c.parquet").read_bytes()[:-100])
    with pytest.raises(UserError, match="trunc.parquet"):
        tokenize_corpus([truncated], tok, 16, tmp_path / "o6")
    # nothing half-written: neither the outputs nor their temporary folders exist
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UserError, match="taken.*already exists"):
        tokenize_corpus([root], tok, 16, tmp_path / "taken")
