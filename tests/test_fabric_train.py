"""train.py under torchrun with 2 processes: simple-ddp and torch-ddp must train the very same model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "model.name=debug-gpt",
    "train.max_steps=3",
    "schedule.warmup_steps=1",
    "schedule.cooldown_steps=1",
    "eval.interval=1000",
    "checkpoint.interval=1000",
    "log.interval=1",
    "log.progress=none",
    "log.plot=false",
]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, nproc: int, *extra: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    cmd = [sys.executable, "train.py", *ARGS, f"run.out_dir={out}", "run.name=t", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += [f"--master_port={free_port()}", "train.py", *ARGS, f"run.out_dir={out}", "run.name=t", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and rows[-1].get("event") == "finished"
    from safetensors.torch import load_file

    return losses, load_file(out / "checkpoints" / "step-00000003" / "model.safetensors")


@pytest.fixture(scope="module")
def simple_ddp(tmp_path_factory):
    return train(tmp_path_factory.mktemp("sddp"), 2, "fabric.strategy=simple-ddp")


def test_simple_ddp_matches_torch_ddp(simple_ddp, tmp_path):
    losses, weights = train(tmp_path, 2, "fabric.strategy=torch-ddp")
    assert losses == pytest.approx(simple_ddp[0], rel=1e-6, abs=1e-6)
    assert weights.keys() == simple_ddp[1].keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, simple_ddp[1][name], rtol=1e-6, atol=1e-6, msg=name)
