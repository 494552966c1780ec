"""Write a recpre checkpoint of a recurrent-depth model in the Huginn-0125 format (config.json + safetensors).

recpre-export-huginn --checkpoint runs/my-run --output my-run-huginn [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

from recpre.cli.options import add_checkpoint
from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="recpre-export-huginn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(parser)
    parser.add_argument("--output", required=True, help="new folder for config.json and model.safetensors")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="tensor dtype (default: as saved)"
    )
    args = parser.parse_args(argv)

    import torch

    from recpre.interop.huginn_checkpoint import export_huginn_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_huginn_checkpoint(args.checkpoint, args.output, dtype=dtype)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
