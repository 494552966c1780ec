"""Token and row statistics per source: packed parquet (rows, tokens, documents, padding) or raw text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recpre.data.packed import COLUMN, open_packed, parquet_files
from recpre.data.sources import iter_documents, skipped_note, source_files
from recpre.data.tokenizer import Tokenizer
from recpre.errors import UserError


def is_packed(path: str | Path) -> bool:
    """A source is packed when its parquet files carry the `input_ids` column."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files or files[0].suffix != ".parquet":
        return False
    try:
        return COLUMN in pq.read_schema(files[0]).names
    except Exception:  # noqa: BLE001 - unreadable: let open_packed report it with the file name
        return True


def packed_stats(path: str | Path) -> dict:
    files = [open_packed(p) for p in parquet_files(path)]
    rows = tokens = eos = pad = 0
    meta = next((f.meta for f in files if f.meta), {})
    for f in files:
        for g in range(len(f.group_rows)):
            block = f.read_group(g)
            rows += len(block)
            tokens += block.size
            if meta.get("eos_id") is not None:
                eos += int(np.count_nonzero(block == meta["eos_id"]))
            if meta.get("pad_id") is not None:
                pad += int(np.count_nonzero(block == meta["pad_id"]))
    if rows == 0:
        raise UserError(f"data {path} holds no rows (empty source)")
    return {
        "source": str(path),
        "kind": "packed",
        "files": len(files),
        "block_size": files[0].row_len - 1,
        "rows": rows,
        "tokens": tokens,
        "documents": eos if meta.get("eos_id") is not None else None,
        "pad_tokens": pad,
        "vocab_size": meta.get("vocab_size"),
    }


def raw_stats(source: str | Path, tokenizer: Tokenizer | None = None, text_field: str = "text") -> dict:
    files = [str(source)] if str(source).startswith("hf:") else source_files(source)
    docs = chars = tokens = 0
    batch: list[str] = []
    skipped: set[Path] = set()
    for doc in iter_documents(source, text_field, skipped):
        docs += 1
        chars += len(doc)
        if tokenizer is not None:
            batch.append(doc)
            if len(batch) >= 1024:
                tokens += sum(map(len, tokenizer.encode_batch(batch)))
                batch = []
    if batch and tokenizer is not None:
        tokens += sum(map(len, tokenizer.encode_batch(batch)))
    if docs == 0:
        raise UserError(f"input {source} holds no documents ({skipped_note(skipped) or 'empty source'})")
    return {
        "source": str(source),
        "kind": "raw",
        "files": len(files),
        "skipped_files": len(skipped),
        "documents": docs,
        "chars": chars,
        "tokens": tokens if tokenizer is not None else None,
    }


def count_tokens(sources: list[str | Path], tokenizer: Tokenizer | None = None, text_field: str = "text") -> list[dict]:
    out = []
    for src in sources:
        if not str(src).startswith("hf:") and not Path(src).exists():
            raise UserError(f"input {src} does not exist; check the path")
        out.append(packed_stats(src) if is_packed(src) else raw_stats(src, tokenizer, text_field))
    return out
