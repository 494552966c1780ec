"""Export a checkpoint as a Hugging Face folder (safetensors, config.json, tokenizer, modeling code).

python evaluate/export_hf.py --checkpoint runs/debug --output hf/debug
# then: AutoModelForCausalLM.from_pretrained("hf/debug", trust_remote_code=True)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recpre.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or checkpoints/latest file")
    p.add_argument("--output", required=True, help="folder to write (must not exist unless --force)")
    p.add_argument("--state-init", choices=["zero", "like-init"], default=None, help="override the initial state")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    from recpre.eval.export import export_hf

    out = export_hf(args.checkpoint, args.output, state_init=args.state_init, force=args.force)
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
