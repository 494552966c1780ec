"""Write a recpre checkpoint of a recurrent-depth model in the Huginn-0125 format (config.json + safetensors).

python evaluate/export_huginn.py --checkpoint runs/my-run --output my-run-huginn [--dtype bfloat16]
"""

import argparse

from recpre.errors import UserError, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or checkpoints/latest")
    parser.add_argument("--output", required=True, help="new folder for config.json and model.safetensors")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="tensor dtype (default: as saved)"
    )
    args = parser.parse_args()

    import torch

    from recpre.interop.huginn_checkpoint import export_huginn_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise UserError(f"--dtype {args.dtype} is not a torch dtype")
    out = export_huginn_checkpoint(args.checkpoint, args.output, dtype=dtype)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)
