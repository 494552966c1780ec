"""Shuffle packed rows globally across shards and split them into train/ and val/ folders.

python scripts/shuffle.py --input DIR --output DIR --val-fraction F --seed S
"""

from __future__ import annotations

import argparse

from recpre.errors import run_cli


def main() -> None:
    from recpre.data.shuffle import shuffle_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder (or file) of packed parquet shards")
    ap.add_argument("--output", required=True, help="new folder; gets train/, val/ and manifest.json")
    ap.add_argument("--val-fraction", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--rows-per-shard", type=int, default=None)
    args = ap.parse_args()
    m = shuffle_split(
        args.input, args.output, val_fraction=args.val_fraction, seed=args.seed, rows_per_shard=args.rows_per_shard
    )
    print(f"wrote {args.output}: train {m['train']['rows']} rows, val {m['val']['rows']} rows")


if __name__ == "__main__":
    run_cli(main)
