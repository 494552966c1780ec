"""Where a chat run's packed data comes from: the conversations of `data.train`/`data.val`, or the embedded
instruction set, rendered, tokenized and packed once into the cache (keyed by inputs, template, tokenizer and
block size) and reused by later runs and ranks."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recpre.data.chat import tokenize_chat
from recpre.data.chat_template import load_chat_template
from recpre.data.corpus import default_cache_dir, prepare_embedded_corpus
from recpre.data.sources import source_files
from recpre.data.tokenizer import Tokenizer, load_tokenizer

CHAT_FORMAT = 1


@dataclass
class ChatData:
    train: list[str]
    val: list[str]
    boundary_id: int  # the token that ends a conversation's document (PAD)
    eos_id: int  # the end of an assistant turn
    vocab_size: int
    source: str


def _fingerprint(sources: list[str], template: str, tokenizer: Tokenizer, block_size: int) -> str:
    h = hashlib.sha256(json.dumps([CHAT_FORMAT, template, block_size]).encode())
    h.update(Path(tokenizer.path).read_bytes() if tokenizer.path else b"")
    for src in sources:
        for f in source_files(src):
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _packed(sources: list[str], template_name: str, tokenizer: Tokenizer, block_size: int, base: Path) -> list[str]:
    key = _fingerprint(sources, load_chat_template(template_name), tokenizer, block_size)
    out = base / f"chat-b{block_size}-{key}"
    if not (out / "manifest.json").is_file():
        if out.exists():  # an empty folder left by an interrupted build: atomic_dir accepts an empty target
            out.rmdir()
        tokenize_chat(sources, tokenizer, block_size, out, chat_template=template_name)
    return [str(out)]


def prepare_chat_data(data: Any, block_size: int) -> ChatData:
    """Packed train/val folders for `data.format: chat` (settings.data), building them on first use."""
    base = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
    else:
        tokenizer = prepare_embedded_corpus(block_size, cache_dir=data.cache_dir).tokenizer()
    if data.train:
        train, val, source = list(data.train), list(data.val), "data.train (chat)"
    else:
        from recpre.data.instructions import write_instruction_set

        folder = base / f"instructions-{sys.implementation.cache_tag}"
        if not (folder / "val.jsonl").is_file():
            write_instruction_set(folder)
        train, val, source = [str(folder / "train.jsonl")], [str(folder / "val.jsonl")], "embedded instruction set"
    return ChatData(
        train=_packed(train, data.chat_template, tokenizer, block_size, base),
        val=_packed(val, data.chat_template, tokenizer, block_size, base) if val else [],
        boundary_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        source=source,
    )
