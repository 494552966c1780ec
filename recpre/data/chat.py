"""Conversations -> packed rows for supervised fine-tuning, with the context tokens flagged.

A conversation ({"messages": [...]}, from JSONL lines or parquet rows) is rendered by its chat template and
tokenized once; tokens outside the assistant turns (system and user turns, role headers) are context:
conditioned on, never targets (when `train.loss_on: assistant`). In the packed file a context token carries
CONTEXT_FLAG (bit 30) in its int32 value; the loader strips the bit and turns the targets it marks into
IGNORE_INDEX. Rows hold whole conversations, each followed by one PAD that ends its document (the file
records PAD as `boundary_id`), so `data.document_mask` keeps conversations from attending to each other
while the EOS that ends an assistant turn stays inside its conversation. A conversation that does not fit
in the rest of a row starts a new row (the rest is PAD); one longer than a row is truncated and counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recpre.data.atomic import atomic_dir, check_output_dir
from recpre.data.chat_template import assistant_spans, check_messages, load_chat_template
from recpre.data.packed import PackedWriter
from recpre.data.pipeline import MANIFEST, write_manifest
from recpre.data.sources import jsonl_objects, source_files
from recpre.data.tokenizer import Tokenizer, tokenizer_info
from recpre.errors import UserError

CONTEXT_FLAG = 1 << 30  # set on context tokens in packed chat files; ids stay below it
log = logging.getLogger(__name__)


@dataclass
class ChatPackStats:
    output: Path
    conversations: int = 0
    truncated: int = 0  # conversations longer than a row, cut to a row
    rows: int = 0
    target_tokens: int = 0  # assistant tokens (targets under loss_on: assistant)
    tokens: int = 0  # conversation tokens, context included
    sources: list[dict] = field(default_factory=list)


def iter_conversations(source: str | Path) -> Iterator[list[dict]]:
    """The checked `messages` of every row of a JSONL/parquet file or folder of them."""
    for path in source_files(source):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(path)
        elif suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            raise UserError(f"chat input {path} is neither .jsonl nor .parquet; give rows of {{'messages': [...]}}")
        for where, messages in rows:
            yield check_messages(messages, where)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for lineno, obj in jsonl_objects(path, "chat input"):
        yield f"chat input {path} line {lineno}", obj.get("messages") if isinstance(obj, dict) else None


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "messages" not in table.column_names:
        raise UserError(f"chat input {path} has no column 'messages' (columns: {', '.join(table.column_names)})")
    for i, messages in enumerate(table.column("messages").to_pylist()):
        yield f"chat input {path} row {i}", messages


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special-token names templates use (bos_token, eos_token, pad_token), from the tokenizer."""
    names = {v: k for k, v in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    found = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    return {k: names[i] for k, i in found.items() if i is not None}


def encode_conversation(tokenizer: Tokenizer, template: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, is_target): a token is a target when it starts inside an assistant turn's span."""
    text, spans = assistant_spans(template, messages, special_tokens(tokenizer))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
    target = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        target |= (starts >= lo) & (starts < hi)
    return ids, target


class ChatPacker:
    """Packs encoded conversations into rows of `block_size + 1` flagged tokens (see the module docstring)."""

    def __init__(self, writer: PackedWriter, pad_id: int):
        self.writer, self.pad_id, self.row_len = writer, pad_id, writer.row_len
        self.row: list[np.ndarray] = []
        self.used = 0
        self.truncated = 0

    def add(self, ids: np.ndarray, target: np.ndarray) -> None:
        flagged = np.where(target, ids, ids | CONTEXT_FLAG).astype(np.int64)
        if len(flagged) > self.row_len:  # longer than a row: its own row, cut
            self.truncated += 1
            self._flush()
            self.writer.add_rows(flagged[None, : self.row_len])
            return
        piece = np.append(flagged, self.pad_id | CONTEXT_FLAG)[: self.row_len]  # the PAD ends its document
        if self.used + len(piece) > self.row_len:
            self._flush()
        self.row.append(piece)
        self.used += len(piece)

    def _flush(self) -> None:
        if self.used:
            row = np.full(self.row_len, self.pad_id | CONTEXT_FLAG, dtype=np.int64)
            row[: self.used] = np.concatenate(self.row)
            self.writer.add_rows(row[None])
        self.row, self.used = [], 0

    def close(self) -> None:
        self._flush()


def chat_file_meta(tokenizer: Tokenizer) -> dict:
    """Packed-file metadata of chat rows: the tokenizer's ids plus the flag and the document boundary."""
    if tokenizer.pad_id is None or tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} needs EOS and PAD tokens for chat data; rebuild it")
    return {**tokenizer_info(tokenizer), "context_flag": CONTEXT_FLAG, "boundary_id": tokenizer.pad_id}


def tokenize_chat(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    block_size: int,
    output: str | Path,
    *,
    chat_template: str = "plain",
    rows_per_shard: int | None = None,
) -> ChatPackStats:
    """Render, tokenize and pack every conversation of `inputs` into a packed folder at `output`."""
    if block_size < 1:
        raise UserError(f"--block-size {block_size} must be >= 1")
    if not inputs:
        raise UserError("no chat input given; name at least one .jsonl/.parquet file or folder of conversations")
    template = load_chat_template(chat_template)
    check_output_dir(output)
    stats = ChatPackStats(output=Path(output))
    with atomic_dir(output) as tmp:
        writer = PackedWriter(tmp, block_size, meta=chat_file_meta(tokenizer), rows_per_shard=rows_per_shard)
        packer = ChatPacker(writer, tokenizer.pad_id)
        for src in inputs:
            count = 0
            for messages in iter_conversations(src):
                ids, target = encode_conversation(tokenizer, template, messages)
                packer.add(ids, target)
                count += 1
                stats.tokens += len(ids)
                stats.target_tokens += int(target[: block_size + 1].sum())
            if count == 0:
                raise UserError(f"chat input {src} holds no conversations; remove it or fill it")
            stats.sources.append({"source": str(src), "conversations": count})
            stats.conversations += count
        packer.close()
        shards = writer.close()
        stats.rows, stats.truncated = writer.num_rows, packer.truncated
        write_manifest(tmp, block_size, tokenizer, shards, stats.sources, stats.conversations)
        manifest = json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))
        manifest["chat"] = {"template": chat_template, "truncated": stats.truncated, "targets": stats.target_tokens}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if stats.truncated:
        log.warning(
            "%d of %d conversations are longer than a row (%d tokens) and were truncated",
            stats.truncated,
            stats.conversations,
            block_size + 1,
        )
    return stats
