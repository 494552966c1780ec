"""Raw sources -> documents -> tokens (EOS after every document) -> packed parquet shards + manifest.json.

Tokenization runs through `encode_batch`, which is parallel over documents in the tokenizers library's Rust
thread pool (all cores, no GIL), so one process keeps every core busy.
The output folder appears only when complete (built under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from recpre.data.atomic import atomic_dir, check_output_dir
from recpre.data.packed import FORMAT_VERSION, PackedWriter
from recpre.data.sources import check_source, iter_documents, skipped_note
from recpre.data.tokenizer import Tokenizer, tokenizer_info
from recpre.errors import UserError

MANIFEST = "manifest.json"


@dataclass
class PackStats:
    output: Path
    num_documents: int = 0
    num_rows: int = 0
    num_tokens: int = 0  # tokens in rows, PAD included
    seconds: float = 0.0
    sources: list[dict] = field(default_factory=list)
    skipped_files: set[Path] = field(default_factory=set)  # folder files that are not UTF-8 text

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def weighted_documents(
    source: str | Path, weight: float, text_field: str = "text", skipped: set[Path] | None = None
) -> Iterator[str]:
    """A source repeated `weight` times: whole passes, then a deterministic fraction of documents (by hash)."""
    if weight < 0 or not math.isfinite(weight):
        raise UserError(f"weight {weight} for source {source} must be a finite number >= 0")
    full, frac = int(weight), weight - int(weight)
    for _ in range(full):
        yield from iter_documents(source, text_field, skipped)
    if frac > 0:
        for i, doc in enumerate(iter_documents(source, text_field, skipped)):
            h = int.from_bytes(hashlib.blake2b(f"{source}:{i}".encode(), digest_size=8).digest(), "little")
            if h / 2**64 < frac:
                yield doc


def _batches(docs: Iterable[str], max_chars: int = 1 << 22, max_docs: int = 4096) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack_documents(
    docs: Iterable[str], tokenizer: Tokenizer, writer: PackedWriter, *, progress=None
) -> tuple[int, int]:
    """Tokenize and append documents (EOS after each) to `writer`; returns (documents, tokens)."""
    eos = tokenizer.eos_id
    if eos is None:
        raise UserError(f"tokenizer {tokenizer.path} has no EOS token (<|eos|>); rebuild it with build_tokenizer.py")
    n_docs = n_tokens = 0
    for batch in _batches(docs):
        ids = tokenizer.encode_batch(batch)
        count = sum(len(x) for x in ids) + len(ids)
        flat = np.fromiter(chain.from_iterable(chain(x, (eos,)) for x in ids), dtype=np.int32, count=count)
        writer.add_tokens(flat)
        n_docs += len(batch)
        n_tokens += count
        if progress is not None:
            progress.update(count)
    return n_docs, n_tokens


def tokenize_corpus(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    block_size: int,
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    text_field: str = "text",
    rows_per_shard: int | None = None,
    progress: bool = False,
) -> PackStats:
    """Tokenize every source into one packed dataset at `output` (which must not exist or be empty)."""
    from tqdm.auto import tqdm

    if block_size < 1:
        raise UserError(f"--block-size {block_size} must be >= 1")
    if not inputs:
        raise UserError("no --input given; name at least one text/jsonl/parquet file or folder")
    if weights is not None and len(weights) != len(inputs):
        raise UserError(f"--weights has {len(weights)} values for {len(inputs)} inputs; give one weight per input")
    check_output_dir(output)
    for src in inputs:
        check_source(src)
    weights = list(weights) if weights is not None else [1.0] * len(inputs)
    start = time.perf_counter()
    stats = PackStats(output=Path(output))
    with atomic_dir(output) as tmp:
        writer = PackedWriter(tmp, block_size, meta=tokenizer_info(tokenizer), rows_per_shard=rows_per_shard)
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress)
        for src, w in zip(inputs, weights):
            docs = weighted_documents(src, w, text_field, stats.skipped_files)
            n_docs, n_tok = pack_documents(docs, tokenizer, writer, progress=bar)
            if n_docs == 0 and w > 0:
                note = skipped_note(stats.skipped_files)
                raise UserError(
                    f"input {src} holds no documents ({note or 'empty source'}); remove it or add UTF-8 text files"
                )
            stats.sources.append({"source": str(src), "weight": w, "documents": n_docs, "tokens": n_tok})
            stats.num_documents += n_docs
        bar.close()
        shards = writer.close()
        stats.num_rows = writer.num_rows
        stats.num_tokens = writer.num_rows * (block_size + 1)
        write_manifest(tmp, block_size, tokenizer, shards, stats.sources, stats.num_documents)
    stats.seconds = time.perf_counter() - start
    return stats


def write_manifest(folder: Path, block_size: int, tokenizer: Tokenizer, shards, sources, num_documents) -> None:
    manifest = {
        "format": FORMAT_VERSION,
        "block_size": block_size,
        "tokenizer": {**tokenizer_info(tokenizer), "path": str(tokenizer.path) if tokenizer.path else None},
        "num_documents": num_documents,
        "num_rows": sum(r for _, r in shards),
        "num_tokens": sum(r for _, r in shards) * (block_size + 1),
        "sources": sources,
        "shards": [{"file": p.name, "rows": r} for p, r in shards],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
