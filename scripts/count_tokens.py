"""`python scripts/count_tokens.py --help`: the same command as `recpre-count-tokens` (recpre/cli/count_tokens.py)."""

from recpre.cli.count_tokens import main

if __name__ == "__main__":
    raise SystemExit(main())
