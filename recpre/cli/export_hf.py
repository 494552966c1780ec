"""Export a checkpoint as a Hugging Face folder (safetensors, config.json, tokenizer, modeling code).

recpre-export-hf --checkpoint runs/debug --output hf/debug      # or: python evaluate/export_hf.py ...
# then: AutoModelForCausalLM.from_pretrained("hf/debug", trust_remote_code=True)
"""

from __future__ import annotations

import argparse

from recpre.cli.options import add_checkpoint
from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="recpre-export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(p)
    p.add_argument("--output", required=True, help="folder to write (must not exist unless --force)")
    p.add_argument(
        "--state-init",
        choices=["zero", "like-init"],
        default="zero",
        help="initial recurrent state of the export: zero (default; the same input always gives the same logits) or "
        "like-init (fresh noise every forward, as in training)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    from recpre.eval.export import export_hf

    out = export_hf(args.checkpoint, args.output, state_init=args.state_init, force=args.force)
    print(f"exported {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
