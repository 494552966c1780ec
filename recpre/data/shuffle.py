"""Global shuffle of packed rows across all shards, with a row-level train/val split.

Two passes with bounded memory: rows are first scattered into random buckets (one per output shard, per
split), then each bucket is loaded, permuted and written as a final shard. A random bucket assignment
followed by a uniform permutation inside each bucket is a uniform permutation of the whole dataset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recpre.data.atomic import atomic_dir, check_output_dir
from recpre.data.packed import COLUMN, FORMAT_VERSION, group_rows, open_packed, parquet_files, shard_rows, write_rows
from recpre.errors import UserError


def shuffle_split(
    input: str | Path,
    output: str | Path,
    *,
    val_fraction: float,
    seed: int,
    rows_per_shard: int | None = None,
    min_val_rows: int = 0,
) -> dict:
    """Write output/train/*.parquet and output/val/*.parquet (rows shuffled) and output/manifest.json.

    The validation split holds round(rows x val_fraction) rows, raised to `min_val_rows` (but never more than half
    the rows) when val_fraction > 0: a small fraction of a small corpus is otherwise too few rows to validate on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if min_val_rows < 0:
        raise UserError(f"--min-val-rows {min_val_rows} must be >= 0")
    check_output_dir(output)
    files = [open_packed(p) for p in parquet_files(input)]
    row_len = files[0].row_len
    for f in files:
        if f.row_len != row_len:
            raise UserError(f"data file {f.path} has rows of {f.row_len} tokens but {files[0].path} has {row_len}")
    total = sum(f.num_rows for f in files)
    if total == 0:
        raise UserError(f"input {input} holds no rows (empty source); tokenize a corpus into it first")
    block_size = row_len - 1
    n_val = round(total * val_fraction)
    if val_fraction > 0:
        n_val = min(total - 1, max(1, n_val, min(min_val_rows, total // 2)))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7])))
    is_val = np.zeros(total, dtype=bool)
    is_val[rng.permutation(total)[:n_val]] = True
    per_shard = rows_per_shard or shard_rows(block_size)
    counts = {"train": total - n_val, "val": n_val}
    n_buckets = {k: max(1, math.ceil(v / per_shard)) if v else 0 for k, v in counts.items()}
    bucket = np.where(
        is_val, rng.integers(0, max(1, n_buckets["val"]), total), rng.integers(0, max(1, n_buckets["train"]), total)
    )
    meta = files[0].schema.metadata or {}
    schema = pa.schema([pa.field(COLUMN, pa.list_(pa.int32(), row_len))], metadata=meta)
    manifest = {
        "format": FORMAT_VERSION,
        "block_size": block_size,
        "seed": seed,
        "val_fraction": val_fraction,
        "min_val_rows": min_val_rows,
    }
    with atomic_dir(output) as tmp:
        scratch = tmp / ".buckets"
        scratch.mkdir()
        writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        pos = 0
        for f in files:  # pass 1: scatter
            for g in range(len(f.group_rows)):
                rows = f.read_group(g).astype(np.int32, copy=False)
                sl = slice(pos, pos + len(rows))
                pos += len(rows)
                for split, mask in (("train", ~is_val[sl]), ("val", is_val[sl])):
                    for b in np.unique(bucket[sl][mask]):
                        sel = rows[mask & (bucket[sl] == b)]
                        key = (split, int(b))
                        if key not in writers:
                            writers[key] = pq.ParquetWriter(
                                scratch / f"{split}-{b}.parquet", schema, compression="none"
                            )
                        values = pa.array(sel.reshape(-1))
                        writers[key].write_table(
                            pa.Table.from_arrays([pa.FixedSizeListArray.from_arrays(values, row_len)], schema=schema)
                        )
        for w in writers.values():
            w.close()
        for split in ("train", "val"):  # pass 2: permute each bucket, write it as a shard
            (tmp / split).mkdir()
            shards = []
            for b in range(n_buckets[split]):
                path = scratch / f"{split}-{b}.parquet"
                if not path.exists():
                    continue
                rows = open_packed(path).read_group_all()
                rows = rows[rng.permutation(len(rows))]
                out = tmp / split / f"part-{len(shards):05d}.parquet"
                write_rows(out, rows, schema, group_rows(block_size))
                shards.append({"file": f"{split}/{out.name}", "rows": len(rows)})
            manifest[split] = {"rows": counts[split], "tokens": counts[split] * row_len, "shards": shards}
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
