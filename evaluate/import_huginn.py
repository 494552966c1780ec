"""Turn a Huginn-0125-format folder into a recpre checkpoint that train.py fine-tunes and evaluate/run.py scores.

huggingface-cli download tomg-group-umd/huginn-0125 --local-dir huginn-0125   # ~14 GB (bf16 shards)
python evaluate/import_huginn.py --input huginn-0125 --output runs/huginn-0125
python evaluate/run.py --checkpoint runs/huginn-0125 --num-steps 4,8,16,32
python train.py --config my.yaml run.init_from=runs/huginn-0125          # fine-tune / continue
"""

import argparse

from recpre.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder with config.json and (sharded) safetensors")
    parser.add_argument(
        "--output", required=True, help="run folder to create; the checkpoint goes to OUTPUT/checkpoints"
    )
    parser.add_argument("--run-name", default=None, help="run.name stored in the settings (default: the folder name)")
    args = parser.parse_args()

    from recpre.interop.huginn_checkpoint import import_huginn_checkpoint

    path = import_huginn_checkpoint(args.input, args.output, run_name=args.run_name)
    print(f"imported {args.input} -> {path}")


if __name__ == "__main__":
    run_cli(main)
