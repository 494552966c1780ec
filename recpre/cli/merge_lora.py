"""Merge a LoRA run's adapters into its base and write a full checkpoint (docs/lora.md).

recpre-merge-lora --checkpoint runs/sft-lora-debug --out runs/sft-lora-debug-merged   # or evaluate/merge_lora.py
# then, like any checkpoint: recpre-chat --checkpoint runs/sft-lora-debug-merged, recpre-export-hf, run.init_from
"""

from __future__ import annotations

import argparse

from recpre.cli.options import add_checkpoint
from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="recpre-merge-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(parser)
    parser.add_argument("--out", required=True, help="run folder to create; the checkpoint goes to OUT/checkpoints")
    parser.add_argument(
        "--base", default=None, help="the base's weights, when they moved since training (default: as recorded)"
    )
    args = parser.parse_args(argv)

    from recpre.lora import merge_checkpoint

    path = merge_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged {args.checkpoint} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
