"""Gradient all-reduce throughput: SimpleFabric's chunk stream vs DDP buckets vs one flat all_reduce.

The gradient set has the shapes of a ~100M-parameter GPT (tied 32k x 768 embedding, 11 gated-MLP layers).
Two figures per method:
  reduce: gradients already computed; time to leave every rank holding the averaged gradients
          (`flat-wire` is one all_reduce of a tensor that already is flat: the bound with no copies at all);
  step:   a cheap synthetic backward that writes every gradient, plus the reduction (DDP overlaps its bucket
          reduction with this backward, so only this figure is fair to it).
Throughput = gradient bytes / time. Run:
  python benchmarks/bench_allreduce.py --world 2 --chunk-mb 4 16 64 --buffers 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recpre.fabric import SimpleFabric  # noqa: E402


def gradient_shapes(vocab: int = 32768, d: int = 768, inter: int = 2048, layers: int = 11) -> list[tuple]:
    shapes: list[tuple] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (2 * inter, d), (d, inter)]
    shapes.append((d,))
    return shapes


class GradSet(nn.Module):
    """Parameters only; forward is a cheap function whose backward writes every gradient."""

    def __init__(self, shapes: list[tuple]) -> None:
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes])

    def forward(self) -> torch.Tensor:
        return torch.stack([p.sum() for p in self.params]).sum()


def timed(fn, iters: int, warmup: int = 1) -> list[float]:
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    def settings(strategy: str, chunk_mb: float) -> SimpleNamespace:
        return SimpleNamespace(strategy=strategy, precision="fp32", device="cpu", chunk_mb=chunk_mb, timeout_s=600)

    base = SimpleFabric(settings("simple-ddp", 25)).launch()
    model = GradSet(gradient_shapes())
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    grads = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(rank * 1000 + i)) for i, p in enumerate(params)
    ]
    rows = []

    def set_grads() -> None:
        for p, g in zip(params, grads):
            p.grad = g  # reused storage: the reductions overwrite it, only the timing matters here

    def backward(m: nn.Module) -> None:
        for p in params:
            p.grad = None
        m().backward()

    def record(name: str, kind: str, times: list[float]) -> None:
        rows.append((name, kind, statistics.median(times), min(times)))

    record("backward only", "step", timed(lambda: backward(model), args.iters))

    for chunk in args.chunk_mb:
        for nbuf in args.buffers:
            fab = SimpleFabric(settings("simple-ddp", chunk)).launch()
            fab.stream_buffers = nbuf
            set_grads()
            name = f"chunk stream {chunk:g} MB x{nbuf}"
            record(name, "reduce", timed(lambda fab=fab: fab.all_reduce_gradients(model), args.iters))
            record(name, "step", timed(lambda fab=fab: (backward(model), fab.all_reduce_gradients(model)), args.iters))

    flat = torch.randn(numel)

    def flat_wire() -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    def flat_copy() -> None:
        buf = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(buf)
        buf.div_(world)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.view(-1).copy_(buf[offset : offset + n])
            offset += n

    record("flat all_reduce (pre-flattened)", "reduce", timed(flat_wire, args.iters))
    set_grads()
    record("flat all_reduce (cat + copy back)", "reduce", timed(flat_copy, args.iters))
    record("flat all_reduce (cat + copy back)", "step", timed(lambda: (backward(model), flat_copy()), args.iters))

    for bucket in args.ddp_bucket_mb:
        fab = SimpleFabric(settings("torch-ddp", bucket)).launch()
        ddp = fab.setup_model(GradSet(gradient_shapes()))
        inner = list(ddp.parameters())

        def ddp_step(ddp=ddp, inner=inner) -> None:
            for p in inner:
                p.grad = None
            ddp().backward()

        record(f"torch DDP buckets {bucket:g} MB", "step", timed(ddp_step, args.iters))

    if rank == 0:
        queue.put((numel, rows))
    base.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[4, 16, 64])
    parser.add_argument("--buffers", type=int, nargs="+", default=[2])
    parser.add_argument("--ddp-bucket-mb", type=float, nargs="+", default=[25])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: torch's default)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.world, free_port(), args, queue), nprocs=args.world, join=True)
    numel, rows = queue.get()
    gib = numel * 4 / 2**30
    backward = next(r[2] for r in rows if r[0] == "backward only")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} cpus, world {args.world} (gloo), {numel / 1e6:.1f}M fp32 gradients ({gib:.3f} GiB), "
        f"median of {args.iters}"
    )
    print()
    print("| method | measure | median s | min s | GiB/s (median) |")
    print("|---|---|---|---|---|")
    for name, kind, med, best in rows:
        rate = "" if name == "backward only" else f"{gib / med:.2f}"
        print(f"| {name} | {kind} | {med:.3f} | {best:.3f} | {rate} |")
    print()
    print(f"step rows include the synthetic backward ({backward:.3f} s median by itself).")
    from report import emit_figures  # benchmarks/report.py: the line run_all.py collects

    emit_figures(
        "allreduce",
        [
            {"name": f"{name} ({kind})", "value": round(gib / med, 3), "unit": "GiB/s", "note": f"world {args.world}"}
            for name, kind, med, _ in rows
            if name != "backward only"
        ],
    )


if __name__ == "__main__":
    main()
