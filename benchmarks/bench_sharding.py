"""Tokens/s and per-rank bytes of each data-parallel strategy, same model and global batch.

Every strategy runs the driver's step through SimpleFabric's methods (setup_model, setup_optimizer, no_sync,
all_reduce_gradients, clip_grad_norm, optimizer_step, memory_report), so the figures are what train.py gets:
simple-ddp, simple-ddp + optimizer sharding (ZeRO-1), torch-ddp, fsdp, and hsdp when the world has >= 4 ranks.
Bytes come from the memory event (storage each rank holds after the first step). Run:

    python benchmarks/bench_sharding.py --world 2 --model debug-recurrent --steps 4            # CPU / gloo
    python benchmarks/bench_sharding.py --full      # every visible GPU, magpie-150m, bf16-mixed
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit_figures  # noqa: E402
from recpre.config import ModelConfig  # noqa: E402
from recpre.fabric import SimpleFabric  # noqa: E402
from recpre.model import build_model  # noqa: E402
from recpre.optim import build_optimizer  # noqa: E402

STRATEGIES = {
    "simple-ddp": dict(strategy="simple-ddp"),
    "simple-ddp+zero1": dict(strategy="simple-ddp", optimizer_sharding=True, shard_group="world"),
    "torch-ddp": dict(strategy="torch-ddp"),
    "fsdp": dict(strategy="fsdp"),
    "hsdp": dict(strategy="hsdp"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_strategy(name: str, args: argparse.Namespace, rank: int, world: int) -> dict | None:
    options = dict(precision=args.precision, device=args.device, chunk_mb=args.chunk_mb, timeout_s=300)
    fabric = SimpleFabric(SimpleNamespace(**options, **STRATEGIES[name])).launch()
    config = ModelConfig.from_name(args.model, block_size=args.block, sampling_scheme="fixed")
    torch.manual_seed(0)
    model = fabric.setup_model(build_model(config, device="meta" if fabric.builds_on_meta else "cpu"))
    optimizer = fabric.setup_optimizer(build_optimizer(fabric.unwrap(model), SimpleNamespace(name=args.optim)))
    params = [p for p in model.parameters() if p.requires_grad]
    accum = args.global_batch // (args.micro_batch * world)
    gen = torch.Generator().manual_seed(rank)
    times, memory = [], None
    for step in range(args.warmup + args.steps):
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        fabric.barrier()
        t0 = time.perf_counter()
        for i in range(accum):
            ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.block), generator=gen).to(fabric.device)
            with fabric.no_sync(model, enabled=i < accum - 1), fabric.autocast():
                model(ids, ids, loss_normalizer=float(ids.numel() * accum)).loss.backward()
        fabric.all_reduce_gradients(model)
        fabric.clip_grad_norm(model, params, 1.0)
        fabric.optimizer_step(optimizer)
        if memory is None:
            memory = fabric.memory_report(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    fabric.barrier()
    fabric.teardown()
    seconds = statistics.median(times)
    return {**memory, "strategy": name, "tokens_per_s": args.global_batch * args.block / seconds, "step_s": seconds}


def worker(rank: int, world: int, ports: list[int], args: argparse.Namespace, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(args.threads)
    for name, port in zip(args.strategies, ports):
        os.environ["MASTER_PORT"] = str(port)  # a fresh store per strategy: the last one's port may linger
        result = one_strategy(name, args, rank, world)
        if rank == 0:
            queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--model", default="debug-recurrent")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--optim", default="adamw")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-mb", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="2 gloo ranks, debug-recurrent, 2 timed steps")
    parser.add_argument("--full", action="store_true", help="every visible GPU, magpie-150m, bf16-mixed")
    args = parser.parse_args()
    if args.quick:
        args.world, args.model, args.steps, args.block = 2, "debug-recurrent", 2, 128
    if args.full:
        args.world, args.model, args.device = max(1, torch.cuda.device_count()), "magpie-150m", "cuda"
        args.precision, args.block, args.micro_batch, args.global_batch = "bf16-mixed", 2048, 4, 32
    if args.strategies is None:
        args.strategies = [s for s in STRATEGIES if s != "hsdp" or args.world >= 4]
    if args.world == 1:
        args.strategies = [s for s in args.strategies if s in ("simple-ddp", "fsdp")]
    ports, ctx = [free_port() for _ in args.strategies], mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.world, ports, args, queue), nprocs=args.world, start_method="spawn")
    rows = [queue.get() for _ in args.strategies]
    print(
        f"model {args.model}, {args.world} ranks on {args.device}, {args.precision}, global batch "
        f"{args.global_batch} x {args.block} tokens, micro-batch {args.micro_batch}, optimizer {args.optim}\n"
    )
    print("| strategy | tokens/s | step s | params MiB/rank | grads MiB/rank | optimizer MiB/rank | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    mib = 2**20
    for r in rows:
        peak = f"{r['peak_bytes'] / mib:.1f}" if r["peak_bytes"] is not None else "n/a"
        print(
            f"| {r['strategy']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['params_bytes'] / mib:.2f} | "
            f"{r['grads_bytes'] / mib:.2f} | {r['optimizer_bytes'] / mib:.2f} | {peak} |"
        )
    emit_figures(
        "sharding",
        [{"name": f"{r['strategy']} tokens/s", "value": round(r["tokens_per_s"], 1), "unit": "tok/s"} for r in rows]
        + [{"name": f"{r['strategy']} optimizer bytes/rank", "value": r["optimizer_bytes"], "unit": "B"} for r in rows],
    )


if __name__ == "__main__":
    main()
