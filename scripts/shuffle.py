"""`python scripts/shuffle.py --help`: the same command as `recpre-shuffle` (recpre/cli/shuffle.py)."""

from recpre.cli.shuffle import main

if __name__ == "__main__":
    raise SystemExit(main())
