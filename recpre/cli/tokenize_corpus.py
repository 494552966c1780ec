"""Tokenize raw sources and pack them into parquet rows of block_size + 1 tokens (EOS after every document).

recpre-tokenize-corpus --input PATH... --tokenizer DIR --block-size N --output DIR [--weights W...]
Weights repeat a source (2 = twice, 0.5 = a deterministic half of its documents).
--format chat reads conversations (JSONL/parquet rows of {"messages": [...]}), renders them with
--chat-template (a built-in: plain | huginn, or a tokenizer_config.json / .jinja file) and packs whole
conversations with their context tokens flagged, as `data.format: chat` does in training.
(`python scripts/tokenize_corpus.py ...` is the same command.)
"""

from __future__ import annotations

import argparse

from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    from recpre.data.pipeline import tokenize_corpus
    from recpre.data.sources import skipped_note
    from recpre.data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(
        prog="recpre-tokenize-corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", nargs="+", required=True, help="text/jsonl/parquet files or folders, or hf:NAME")
    ap.add_argument("--tokenizer", required=True, help="folder holding tokenizer.json")
    ap.add_argument("--block-size", type=int, required=True, help="model context; rows hold block_size + 1 tokens")
    ap.add_argument("--output", required=True, help="new folder for the packed shards")
    ap.add_argument("--weights", nargs="+", type=float, default=None, help="one repetition factor per input")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--rows-per-shard", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--format", choices=("text", "chat"), default="text", help="text documents or conversations")
    ap.add_argument("--chat-template", default="plain", help="chat: a built-in (plain | huginn) or a template file")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    if args.format == "chat":
        return _chat(args, tok)
    stats = tokenize_corpus(
        args.input,
        tok,
        args.block_size,
        args.output,
        weights=args.weights,
        text_field=args.text_field,
        rows_per_shard=args.rows_per_shard,
        progress=not args.no_progress,
    )
    note = skipped_note(stats.skipped_files)
    if note:
        print(note)
    print(
        f"wrote {stats.output}: {stats.num_documents} documents, {stats.num_rows} rows, {stats.num_tokens} tokens "
        f"in {stats.seconds:.1f}s ({stats.tokens_per_s / 1e6:.2f} Mtok/s)"
    )
    return 0


def _chat(args: argparse.Namespace, tok) -> int:
    from recpre.data.chat import tokenize_chat
    from recpre.errors import UserError

    if args.weights is not None:
        raise UserError("--weights is for text sources; repeat a conversation file in --input instead")
    stats = tokenize_chat(
        args.input,
        tok,
        args.block_size,
        args.output,
        chat_template=args.chat_template,
        rows_per_shard=args.rows_per_shard,
    )
    print(
        f"wrote {stats.output}: {stats.conversations} conversations ({stats.truncated} truncated), {stats.rows} rows, "
        f"{stats.target_tokens} assistant tokens of {stats.tokens}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
