"""Score a checkpoint with lm-eval (bundled offline tasks, lm-eval's own, local task YAMLs) at one or several
recurrence depths: `python evaluate/run.py --help`, the same command as `recpre-evaluate` (recpre/cli/evaluate.py)."""

from recpre.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
