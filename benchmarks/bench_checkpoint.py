"""Checkpoint save and reshard-load time: gathered single-file vs sharded (DCP, every rank writes its shards).

Each rank trains one step under fsdp (so the optimizer holds state), then saves the same state twice through
recpre.checkpoint.save_checkpoint: gathered onto rank 0 (the single-file format) and sharded (each rank its own
DCP shards). The save time is the training stall (a synchronous save stops every rank). The sharded checkpoint
is then loaded at another world size: one process reads the whole state (recpre.sharded_checkpoint) and loads
it into an unsharded model and optimizer. Run:

    python benchmarks/bench_checkpoint.py --quick                 # 2 gloo ranks, debug-recurrent
    python benchmarks/bench_checkpoint.py --full                  # every visible GPU, magpie-150m
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit_figures  # noqa: E402
from recpre.checkpoint import save_checkpoint  # noqa: E402
from recpre.config import ModelConfig  # noqa: E402
from recpre.fabric import SimpleFabric  # noqa: E402
from recpre.model import build_model  # noqa: E402
from recpre.optim import build_optimizer  # noqa: E402
from recpre.sharded_checkpoint import local_shards, read_full_state  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_saves(fabric, model, optimizer, root: Path, repeats: int, sharded: bool) -> list[float]:
    times = []
    for i in range(repeats):
        fabric.barrier()
        t0 = time.perf_counter()
        if sharded:
            shards, extras = local_shards(fabric, model, optimizer)
            weights = None
        else:
            full = fabric.full_state_dict(model, optimizer)
            shards, weights, extras = None, full["model"], full["optimizer"]
        save_checkpoint(
            root,
            i + 1,
            model=weights,
            model_config={},
            settings_yaml="",
            state={"optimizer": extras},
            rank_state={},
            fabric=fabric,
            keep=1,
            shards=shards,
        )
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    options = dict(strategy="fsdp", precision=args.precision, device=args.device, chunk_mb=25.0, timeout_s=600)
    fabric = SimpleFabric(SimpleNamespace(**options)).launch()
    config = ModelConfig.from_name(args.model, block_size=args.block, sampling_scheme="fixed")
    torch.manual_seed(0)
    model = fabric.setup_model(build_model(config, device="meta" if fabric.builds_on_meta else "cpu"))
    optimizer = fabric.setup_optimizer(build_optimizer(fabric.unwrap(model), SimpleNamespace(name="adamw")))
    ids = torch.randint(0, config.vocab_size, (1, args.block)).to(fabric.device)
    t0 = time.perf_counter()
    with fabric.autocast():
        model(ids, ids).loss.backward()
    fabric.optimizer_step(optimizer)
    step_s = time.perf_counter() - t0
    gathered = timed_saves(fabric, model, optimizer, Path(out) / "gathered", args.repeats, sharded=False)
    sharded = timed_saves(fabric, model, optimizer, Path(out) / "sharded", args.repeats, sharded=True)
    fabric.barrier()
    fabric.teardown()
    if rank == 0:
        queue.put({"step_s": step_s, "gathered": gathered, "sharded": sharded, "params": config.num_params()})


def reshard_load(folder: Path, model_name: str, block: int) -> float:
    """One process loads the sharded checkpoint whole into an unsharded model and optimizer."""
    config = ModelConfig.from_name(model_name, block_size=block, sampling_scheme="fixed")
    model = build_model(config, device="cpu")
    optimizer = build_optimizer(model, SimpleNamespace(name="adamw"))
    t0 = time.perf_counter()
    extras = torch.load(folder / "state.pt", weights_only=True)["optimizer"]
    full = read_full_state(folder, extras)
    model.load_state_dict(full["model"], strict=True)
    from recpre.optim import load_optimizer_state

    load_optimizer_state(optimizer, full["optimizer"], source=str(folder))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--model", default="debug-recurrent")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 gloo ranks, debug-recurrent")
    parser.add_argument("--full", action="store_true", help="every visible GPU, magpie-150m, bf16-mixed")
    args = parser.parse_args()
    if args.full:
        args.world, args.model, args.device = max(1, torch.cuda.device_count()), "magpie-150m", "cuda"
        args.precision, args.block = "bf16-mixed", 2048
    out = tempfile.mkdtemp(prefix="bench-checkpoint-")
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(worker, args=(args.world, free_port(), args, out, queue), nprocs=args.world)
        r = queue.get()
        latest = (Path(out) / "sharded" / "latest").read_text().strip()
        load_s = reshard_load(Path(out) / "sharded" / latest, args.model, args.block)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    gathered, sharded = statistics.median(r["gathered"]), statistics.median(r["sharded"])
    print(f"model {args.model} ({r['params'] / 1e6:.1f}M params), {args.world} ranks fsdp on {args.device}, AdamW\n")
    print("| what | seconds |\n|---|---|")
    print(f"| one training step (first, incl. warm-up) | {r['step_s']:.3f} |")
    print(f"| save, gathered single file (stall) | {gathered:.3f} |")
    print(f"| save, sharded DCP (stall) | {sharded:.3f} |")
    print(f"| load at a reshard ({args.world} ranks -> 1 process) | {load_s:.3f} |")
    emit_figures(
        "checkpoint",
        [
            {"name": "save gathered single-file", "value": round(gathered, 4), "unit": "s"},
            {"name": "save sharded DCP", "value": round(sharded, 4), "unit": "s"},
            {"name": f"load reshard {args.world}->1", "value": round(load_s, 4), "unit": "s"},
        ],
    )


if __name__ == "__main__":
    main()
