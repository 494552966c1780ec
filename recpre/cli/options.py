"""Flags that mean the same thing in every recpre command line: the same name, type and default everywhere."""

from __future__ import annotations

import argparse

from recpre.errors import UserError


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or checkpoints/latest file")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (as training picks: CUDA/ROCm, else MPS, else CPU), cpu, cuda, cuda:N or mps (default auto)",
    )


def num_steps(text: str) -> list[int]:
    """One depth or several, comma-separated ("8" or "1,4,8"), each a positive integer, duplicates dropped."""
    depths: list[int] = []
    for item in str(text).split(","):
        try:
            depth = int(item.strip())
        except ValueError:
            raise UserError(f"--num-steps {text!r}: use positive integers such as 8 or 1,4,8") from None
        if depth < 1:
            raise UserError(f"--num-steps {text!r}: depths must be positive integers")
        if depth not in depths:
            depths.append(depth)
    return depths


def add_num_steps(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--num-steps",
        type=num_steps,
        default=None,
        help=f"recurrence depth(s), one or several: 8 or 1,4,8 ({what}; default: the model's mean depth)",
    )
