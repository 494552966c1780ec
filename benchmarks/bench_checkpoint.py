"""Checkpoint save and reshard-load time: gathered single-file vs sharded (DCP, every rank writes its shards).

Each rank trains one step under fsdp (so the optimizer holds state), then saves the same state twice through
recpre.checkpoint.save_checkpoint: gathered onto rank 0 (the single-file format) and sharded (each rank its own
DCP shards). The save time is the training stall (a synchronous save stops every rank). Then the run's own save
(recpre.train_state.RunState.save, sharded) is timed synchronous and asynchronous (`checkpoint.async`): the
stall is the time the loop spends blocked in save(), next to a steady-state training step; an asynchronous
save's write then goes on in the background while the next step trains. The sharded checkpoint is then loaded
at another world size: one process reads the whole state (recpre.sharded_checkpoint) and loads it into an
unsharded model and optimizer. Run:

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
from recpre.step_backends import EagerStep  # noqa: E402
from recpre.train_state import RunState  # noqa: E402


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


def run_save_stalls(fabric, model, optimizer, train_step, root: Path, repeats: int, async_save: bool) -> dict:
    """RunState.save as the training loop calls it: the stall (time blocked in save(), the previous write already
    complete), one training step taken right after it (with an asynchronous write in flight), and the time until
    the checkpoint is complete."""
    parts = RunState(fabric, EagerStep(), model, optimizer, {}, "", root, keep=1, async_save=async_save)
    stalls, steps, complete = [], [], []
    for i in range(repeats):
        fabric.barrier()
        t0 = time.perf_counter()
        parts.save(i + 1)
        stalls.append(time.perf_counter() - t0)
        steps.append(train_step())
        parts.wait()
        complete.append(time.perf_counter() - t0)
    return {"stall": stalls, "step_during": steps, "complete": complete}


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

    def train_step() -> float:
        t0 = time.perf_counter()
        with fabric.autocast():
            model(ids, ids).loss.backward()
        fabric.optimizer_step(optimizer)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step_s = train_step()
    steady = statistics.median(train_step() for _ in range(args.repeats + 2))
    gathered = timed_saves(fabric, model, optimizer, Path(out) / "gathered", args.repeats, sharded=False)
    sharded = timed_saves(fabric, model, optimizer, Path(out) / "sharded", args.repeats, sharded=True)
    stalls = {
        mode: run_save_stalls(fabric, model, optimizer, train_step, Path(out) / mode, args.repeats, mode == "async")
        for mode in ("sync", "async")
    }
    fabric.barrier()
    fabric.teardown()
    if rank == 0:
        queue.put(
            {"step_s": step_s, "steady_step_s": steady, "gathered": gathered, "sharded": sharded, "stalls": stalls,
             "params": config.num_params()}
        )  # fmt: skip


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
    med = {mode: {k: statistics.median(v) for k, v in m.items()} for mode, m in r["stalls"].items()}
    step = r["steady_step_s"]
    print(f"model {args.model} ({r['params'] / 1e6:.1f}M params), {args.world} ranks fsdp on {args.device}, AdamW\n")
    print("| what | seconds |\n|---|---|")
    print(f"| one training step (first, incl. warm-up) | {r['step_s']:.3f} |")
    print(f"| one training step (median, steady state) | {step:.3f} |")
    print(f"| save, gathered single file (stall) | {gathered:.3f} |")
    print(f"| save, sharded DCP (stall) | {sharded:.3f} |")
    print(f"| load at a reshard ({args.world} ranks -> 1 process) | {load_s:.3f} |")
    print("\nThe run's save (RunState.save, sharded), as the training loop sees it:\n")
    print("| save | stall (loop blocked in save) | stall / step | next step | checkpoint complete after |")
    print("|---|---|---|---|---|")
    for mode in ("sync", "async"):
        m = med[mode]
        print(
            f"| {mode} | {m['stall']:.4f} s | {m['stall'] / step:.2f} | {m['step_during']:.3f} s | {m['complete']:.3f} s |"
        )
    verdict = "under" if med["async"]["stall"] < step else "NOT under"
    print(f"\nasync stall {med['async']['stall']:.4f} s is {verdict} one step ({step:.3f} s)")
    emit_figures(
        "checkpoint",
        [
            {"name": "save gathered single-file", "value": round(gathered, 4), "unit": "s"},
            {"name": "save sharded DCP", "value": round(sharded, 4), "unit": "s"},
            {"name": f"load reshard {args.world}->1", "value": round(load_s, 4), "unit": "s"},
            {"name": "training step (steady)", "value": round(step, 4), "unit": "s"},
            {"name": "save stall sync", "value": round(med["sync"]["stall"], 4), "unit": "s"},
            {"name": "save stall async", "value": round(med["async"]["stall"], 4), "unit": "s"},
        ],
    )


if __name__ == "__main__":
    main()
