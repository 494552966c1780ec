"""Turn a Huginn-0125-format folder into a recpre checkpoint that train.py fine-tunes and recpre-evaluate scores.

huggingface-cli download tomg-group-umd/huginn-0125 --local-dir huginn-0125   # ~14 GB (bf16 shards)
recpre-import-huginn --input huginn-0125 --output runs/huginn-0125
recpre-evaluate --checkpoint runs/huginn-0125 --num-steps 4,8,16,32
python train.py --config my.yaml run.init_from=runs/huginn-0125          # fine-tune / continue
"""

from __future__ import annotations

import argparse

from recpre.errors import run_command


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="recpre-import-huginn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="folder with config.json and (sharded) safetensors")
    parser.add_argument(
        "--output", required=True, help="run folder to create; the checkpoint goes to OUTPUT/checkpoints"
    )
    parser.add_argument("--run-name", default=None, help="run.name stored in the settings (default: the folder name)")
    args = parser.parse_args(argv)

    from recpre.interop.huginn_checkpoint import import_huginn_checkpoint

    path = import_huginn_checkpoint(args.input, args.output, run_name=args.run_name)
    print(f"imported {args.input} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv))
