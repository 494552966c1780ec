"""Sample text from a checkpoint: `python evaluate/generate.py --help`, the same command as `recpre-generate`
(recpre/cli/generate.py)."""

from recpre.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
