"""Shuffle packed rows globally across shards and split them into train/ and val/ folders.

recpre-shuffle --input DIR --output DIR --val-fraction F --seed S [--min-val-rows N]
(`python scripts/shuffle.py ...` is the same command.)
"""

from __future__ import annotations

import argparse

from recpre.errors import run_command

MIN_VAL_ROWS = 16


def _run(argv: list[str] | None) -> int:
    from recpre.data.shuffle import shuffle_split

    ap = argparse.ArgumentParser(
        prog="recpre-shuffle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", required=True, help="folder (or file) of packed parquet shards")
    ap.add_argument("--output", required=True, help="new folder; gets train/, val/ and manifest.json")
    ap.add_argument("--val-fraction", type=float, required=True, help="share of the rows held out for validation")
    ap.add_argument(
        "--min-val-rows",
        type=int,
        default=MIN_VAL_ROWS,
        help=f"hold out at least this many rows (at most half) when --val-fraction > 0 (default {MIN_VAL_ROWS}: one "
        "validation micro-batch of 4 rows on each of 4 processes, what the default run needs)",
    )
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--rows-per-shard", type=int, default=None)
    args = ap.parse_args(argv)
    m = shuffle_split(
        args.input,
        args.output,
        val_fraction=args.val_fraction,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        min_val_rows=args.min_val_rows,
    )
    total = m["train"]["rows"] + m["val"]["rows"]
    raised = m["val"]["rows"] > max(1, round(total * args.val_fraction))
    why = (
        f" (--val-fraction {args.val_fraction} gives {round(total * args.val_fraction)}; --min-val-rows)"
        if raised
        else ""
    )
    print(f"wrote {args.output}: train {m['train']['rows']} rows, val {m['val']['rows']} rows{why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
