"""Export a checkpoint as a Hugging Face folder: `python evaluate/export_hf.py --help`, the same command as `recpre-export-hf` (recpre/cli/export_hf.py)."""

from recpre.cli.export_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
