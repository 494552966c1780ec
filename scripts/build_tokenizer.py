"""`python scripts/build_tokenizer.py --help`: the same command as `recpre-build-tokenizer` (recpre/cli/build_tokenizer.py)."""

from recpre.cli.build_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
