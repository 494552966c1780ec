"""Flags that mean the same thing in every recpre command line: the same name, type and default everywhere."""

from __future__ import annotations

import argparse

from recpre.eval.sweep import parse_depths


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
    return [d for d in parse_depths(text) if d is not None]


def add_num_steps(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--num-steps",
        type=num_steps,
        default=None,
        help=f"recurrence depth(s), one or several: 8 or 1,4,8 ({what}; default: the model's mean depth)",
    )
