"""Token and row statistics per source (packed parquet folders, or raw text/jsonl/parquet with --tokenizer).

recpre-count-tokens DIR... [--tokenizer DIR] [--json]
(`python scripts/count_tokens.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
import json

from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    from recpre.data.stats import count_tokens
    from recpre.data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(
        prog="recpre-count-tokens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("inputs", nargs="+", help="packed folders/files, or raw text/jsonl/parquet files or folders")
    ap.add_argument("--tokenizer", default=None, help="count tokens of raw sources with this tokenizer")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--json", action="store_true", help="one JSON object per source")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    rows = count_tokens(args.inputs, tok, args.text_field)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print("  ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    if not args.json and len(rows) > 1:
        print(f"total tokens={sum(r.get('tokens') or 0 for r in rows)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
