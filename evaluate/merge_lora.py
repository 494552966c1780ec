"""Merge LoRA adapters into their base as a full checkpoint: `python evaluate/merge_lora.py --help`, the same command
as `recpre-merge-lora` (recpre/cli/merge_lora.py)."""

from recpre.cli.merge_lora import main

if __name__ == "__main__":
    raise SystemExit(main())
