"""`python scripts/tokenize_corpus.py --help`: the same command as `recpre-tokenize-corpus` (recpre/cli/tokenize_corpus.py)."""

from recpre.cli.tokenize_corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
