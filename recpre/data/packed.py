"""The packed-token parquet format: write rows, open and validate files, read row groups as numpy.

A packed file has one column `input_ids`: fixed-size lists of `block_size + 1` int32 tokens (a row gives
inputs [:-1] and labels [1:]). Documents are concatenated with EOS after each; the very last row of a
pipeline output is padded with PAD (the loader masks PAD labels). Row groups hold 64-512 rows because
random access decodes a whole row group. The schema metadata key `recpre` holds JSON with block_size,
vocab_size, bos_id, eos_id, pad_id. Foreign files with a list<int> `input_ids` column are accepted if every
row has the same length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recpre.errors import UserError

COLUMN = "input_ids"
META_KEY = b"recpre"
FORMAT_VERSION = 1
MIN_GROUP_ROWS, MAX_GROUP_ROWS = 64, 512


def group_rows(block_size: int) -> int:
    """Rows per row group: ~1 MB of int32 tokens, clamped to 64-512 rows."""
    return int(min(MAX_GROUP_ROWS, max(MIN_GROUP_ROWS, (1 << 18) // (block_size + 1))))


def shard_rows(block_size: int, target_tokens: int = 1 << 26) -> int:
    """Rows per shard file: a whole number of row groups, ~64M tokens (256 MB) by default."""
    g = group_rows(block_size)
    return max(g, (target_tokens // (block_size + 1)) // g * g)


def parquet_files(path: str | Path) -> list[Path]:
    """A packed source: one parquet file or every *.parquet under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; check data.train / data.val or --input")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"data folder {path} holds no .parquet files; tokenize a corpus into it first")
    return files


class PackedWriter:
    """Streams tokens (or whole rows) into shard files `part-NNNNN.parquet` inside an existing folder."""

    def __init__(
        self,
        folder: str | Path,
        block_size: int,
        *,
        meta: dict,
        rows_per_shard: int | None = None,
        rows_per_group: int | None = None,
        prefix: str = "part",
    ):
        self.folder = Path(folder)
        self.row_len = block_size + 1
        self.rows_per_group = rows_per_group or group_rows(block_size)
        self.rows_per_shard = rows_per_shard or shard_rows(block_size)
        self.prefix = prefix
        info = {"format": FORMAT_VERSION, "block_size": block_size, **meta}
        self.pad_id = meta.get("pad_id")
        self.schema = pa.schema(
            [pa.field(COLUMN, pa.list_(pa.int32(), self.row_len))], metadata={META_KEY: json.dumps(info)}
        )
        self._pending: list[np.ndarray] = []  # token chunks not yet forming a whole row
        self._pending_len = 0
        self._rows: list[np.ndarray] = []  # whole rows for the current shard
        self._rows_len = 0
        self.shards: list[tuple[Path, int]] = []
        self.num_rows = 0

    def add_tokens(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=np.int32))
        self._pending_len += len(tokens)
        if self._pending_len >= self.row_len:
            flat = np.concatenate(self._pending)
            n = len(flat) // self.row_len
            self.add_rows(flat[: n * self.row_len].reshape(n, self.row_len))
            rest = flat[n * self.row_len :]
            self._pending, self._pending_len = [rest], len(rest)

    def add_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int32)
        assert rows.ndim == 2 and rows.shape[1] == self.row_len
        while len(rows):
            take = min(len(rows), self.rows_per_shard - self._rows_len)
            self._rows.append(rows[:take])
            self._rows_len += take
            rows = rows[take:]
            if self._rows_len == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._rows_len:
            return
        rows = np.concatenate(self._rows)
        path = self.folder / f"{self.prefix}-{len(self.shards):05d}.parquet"
        write_rows(path, rows, self.schema, self.rows_per_group)
        self.shards.append((path, len(rows)))
        self.num_rows += len(rows)
        self._rows, self._rows_len = [], 0

    def close(self) -> list[tuple[Path, int]]:
        """Pad the last partial row with PAD (no token is lost), write what is left, return (shard, rows)."""
        if self._pending_len:
            if self.pad_id is None:
                raise UserError("the tokenizer has no pad token (<|pad|>); rebuild it with scripts/build_tokenizer.py")
            flat = np.concatenate(self._pending)
            row = np.full(self.row_len, self.pad_id, dtype=np.int32)
            row[: len(flat)] = flat
            self._pending, self._pending_len = [], 0
            self.add_rows(row[None])
        self._flush()
        return self.shards


def write_rows(path: Path, rows: np.ndarray, schema: pa.Schema, rows_per_group: int) -> None:
    values = pa.array(np.ascontiguousarray(rows, dtype=np.int32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, rows.shape[1])
    table = pa.Table.from_arrays([column], schema=schema)
    # PLAIN encoding, no compression: reads ~30% faster than dictionary pages; token ids barely compress.
    pq.write_table(table, path, row_group_size=rows_per_group, compression="none", use_dictionary=False)


@dataclass
class PackedFile:
    """One validated packed parquet file: row-group sizes and recorded token ids; reads row groups."""

    path: Path
    row_len: int
    group_rows: list[int]
    meta: dict = field(default_factory=dict)
    _pf: pq.ParquetFile | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return sum(self.group_rows)

    @property
    def schema(self) -> pa.Schema:
        return self._file().schema_arrow

    def _file(self) -> pq.ParquetFile:
        if self._pf is None:
            self._pf = pq.ParquetFile(self.path, memory_map=True)
        return self._pf

    def read_group(self, index: int) -> np.ndarray:
        """Rows of one row group as an int32-or-wider array [rows, row_len]."""
        try:
            column = self._file().read_row_group(index, columns=[COLUMN]).column(0).combine_chunks()
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"data file {self.path} row group {index} cannot be read (corrupted?): {err}") from None
        return rows_from_arrow(column, self.row_len, self.path)

    def read_group_all(self) -> np.ndarray:
        """Every row of the file (for tools that hold a shard in memory)."""
        parts = [self.read_group(i) for i in range(len(self.group_rows))]
        return np.concatenate(parts) if parts else np.zeros((0, self.row_len), dtype=np.int32)


def rows_from_arrow(column: pa.Array, row_len: int, path: Path) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten()
    else:
        offsets = column.offsets.to_numpy()
        lengths = np.diff(offsets)
        if len(lengths) and (lengths.min() != row_len or lengths.max() != row_len):
            bad = int(lengths[lengths != row_len][0])
            raise UserError(f"data file {path} has a row of {bad} tokens, expected {row_len} (block_size + 1)")
        values = column.flatten()
    if values.null_count:
        raise UserError(f"data file {path} has null tokens in column '{COLUMN}'; re-tokenize it")
    return values.to_numpy(zero_copy_only=False).reshape(-1, row_len)


def open_packed(path: str | Path, block_size: int | None = None) -> PackedFile:
    """Open one file, check column, type, row length (against block_size when given) and footer."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"data file {path} is not a readable parquet file (corrupted or truncated?): {err}") from None
    schema = pf.schema_arrow
    if COLUMN not in schema.names:
        raise UserError(
            f"data file {path} has no column '{COLUMN}' (columns: {', '.join(schema.names)}); "
            "tokenize raw text with scripts/tokenize_corpus.py first"
        )
    typ = schema.field(COLUMN).type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) or not (
        pa.types.is_integer(typ.value_type)
    ):
        raise UserError(f"data file {path} column '{COLUMN}' has type {typ}; expected a list of integer tokens")
    raw_meta = (schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    if pa.types.is_fixed_size_list(typ):
        row_len = typ.list_size
    elif meta.get("block_size"):
        row_len = int(meta["block_size"]) + 1
    elif block_size is not None:
        row_len = block_size + 1
    else:
        first = pf.read_row_group(0, columns=[COLUMN]).column(0) if pf.num_row_groups else None
        row_len = len(first[0]) if first is not None and len(first) else 0
    if block_size is not None and row_len != block_size + 1:
        raise UserError(
            f"data file {path} has rows of {row_len} tokens but block_size {block_size} needs {block_size + 1}; "
            f"re-tokenize with --block-size {block_size} (scripts/tokenize_corpus.py) or set "
            f"model.overrides.block_size={row_len - 1}"
        )
    groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    return PackedFile(path=path, row_len=row_len, group_rows=groups, meta=meta, _pf=pf)
