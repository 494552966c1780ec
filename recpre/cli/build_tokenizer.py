"""Train a byte-level BPE tokenizer (special tokens <|bos|> <|eos|> <|pad|>) and save DIR/tokenizer.json.

recpre-build-tokenizer --input PATH... --vocab-size N --output DIR
(`python scripts/build_tokenizer.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
import itertools

from recpre.errors import UserError, run_command


def _run(argv: list[str] | None) -> int:
    from recpre.data.atomic import atomic_dir
    from recpre.data.sources import check_source, iter_documents, skipped_note
    from recpre.data.tokenizer import train_tokenizer

    ap = argparse.ArgumentParser(
        prog="recpre-build-tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", nargs="+", required=True, help="text/jsonl/parquet files or folders, or hf:NAME")
    ap.add_argument("--vocab-size", type=int, required=True, help="total ids, special tokens included")
    ap.add_argument("--output", required=True, help="new folder for tokenizer.json")
    ap.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    ap.add_argument("--max-chars", type=int, default=None, help="train on the first documents up to this many chars")
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)
    for src in args.input:
        check_source(src)

    skipped: set = set()
    seen = [0]

    def documents():
        chars = 0
        for doc in itertools.chain.from_iterable(iter_documents(s, args.text_field, skipped) for s in args.input):
            if args.max_chars is not None and chars >= args.max_chars:
                return
            chars += len(doc)
            seen[0] += 1
            yield doc

    with atomic_dir(args.output) as tmp:
        tok = train_tokenizer(documents(), args.vocab_size, tmp, min_frequency=args.min_frequency, show_progress=True)
        if seen[0] == 0:
            raise UserError(
                f"--input {' '.join(args.input)} holds no documents ({skipped_note(skipped) or 'empty'}); "
                "add UTF-8 text files"
            )
    if skipped_note(skipped):
        print(skipped_note(skipped))
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus only supports {tok.vocab_size} tokens (asked for {args.vocab_size})")
    print(
        f"wrote {args.output}/tokenizer.json (vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
