"""Embedded corpus: build (small max_files subset), reuse, split, concurrent builders."""

from __future__ import annotations

import subprocess
import sys

from recpre.data.corpus import VAL_PERCENT, corpus_key, prepare_embedded_corpus, split_documents
from recpre.data.loader import PackedLoader
from recpre.data.packed import open_packed

MAX_FILES = 40

BUILD = """
import sys
from recpre.data.corpus import prepare_embedded_corpus
c = prepare_embedded_corpus(32, sys.argv[1], max_files=40, progress=False)
print(c.root)
"""


def test_build_reuse_and_load(tmp_path):
    corpus = prepare_embedded_corpus(32, tmp_path, max_files=MAX_FILES, progress=False)
    assert corpus.root == tmp_path / corpus_key(32, MAX_FILES)
    assert corpus.train and corpus.val and corpus.block_size == 32
    assert corpus.vocab_size <= 4096 and corpus.eos_id == 1 and corpus.pad_id == 2
    tok = corpus.tokenizer()
    for path in corpus.train + corpus.val:
        f = open_packed(path, 32)
        assert f.meta["eos_id"] == tok.eos_id
        assert all(64 <= g <= 512 for g in f.group_rows[:-1]) and f.group_rows[-1] <= 512
    # rows decode back to Python source text
    first = open_packed(corpus.train[0]).read_group(0)[0]
    assert "\n" in tok.decode(first.tolist())
    built = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in corpus.root.rglob("*")}
    again = prepare_embedded_corpus(32, tmp_path, max_files=MAX_FILES)
    # Reused, not rebuilt: the same folder with every file untouched.
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in again.root.rglob("*")} == built
    assert again.train == corpus.train and again.info == corpus.info
    loader = PackedLoader(corpus.train, block_size=32, micro_batch_size=4, eos_id=corpus.eos_id)
    x, y = next(loader)
    assert x.shape == (4, 32) and int(x.max()) < corpus.vocab_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_split_is_deterministic_by_file():
    docs = [(f"pkg/mod{i}.py", "x") for i in range(400)]
    train, val = split_documents(docs)
    assert split_documents(list(reversed(docs)))[1] == list(reversed(val))
    assert {d[0] for d in train}.isdisjoint(d[0] for d in val)
    assert 0 < len(val) < 3 * VAL_PERCENT * 4


def test_concurrent_builders_agree(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == sorted([corpus_key(32, MAX_FILES), f".{corpus_key(32, MAX_FILES)}.lock"])
