"""Step time vs node count on paper, from a single-device step time and the bytes of the chunked all-reduce.

    python benchmarks/scaling_model.py                          # nebel-raven-3.5b on 1..512 H100 nodes (stated network)
    python benchmarks/scaling_model.py --cluster frontier       # ... on Frontier-like nodes (8 MI250X GCDs)
    python benchmarks/scaling_model.py --micro-step-s 2.1       # ... from a measured single-GPU micro-step time
    python benchmarks/scaling_model.py --measure --quick        # + check the model on this CPU: 1, 2, 3 gloo processes

The model (simple-ddp, data parallel, gradients reduced once per optimizer step, after the backward, no overlap):

    step(nodes) = accum x t_micro + t_allreduce
    accum       = global_batch / (nodes x gpus_per_node x micro_batch)
    t_allreduce = bandwidth term + chunks x latency term
      bandwidth = 2 (g-1)/g x B / intra_bw  +  2 (n-1)/n x B / inter_bw      (hierarchical ring, B = stream bytes)
      latency   = min(ring: 2 (G-1) alpha, tree: 2 log2(G) alpha) per chunk  (G = n x g ranks; NCCL picks the faster)
    B = 4 x (parameters + parameter tensors): SimpleFabric streams every gradient as fp32 plus one has-gradient flag
        per tensor, through chunks of fabric.chunk_mb MiB (recpre/grad_stream.py).

The CPU check (`--measure`) times a small model under torchrun with 1, 2 and 3 processes (gloo, 1 thread each):
per step the compute (forward+backward), the wait for the slowest rank, the gradient all-reduce and the optimizer
step, separately. It calibrates alpha and beta of SimpleFabric's gradient stream over this machine's loopback gloo
on synthetic gradients (chunk count and bytes varied independently; 2 processes), then predicts the all-reduce
and step time of the model's own layout at 2 and 3 processes and compares them with the measured ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))

from report import emit_figures  # noqa: E402

from recpre.errors import UserError, run_cli  # noqa: E402

RESULT_PREFIX = "SCALING_RESULT "
# Stated (not measured) figures per cluster kind: bf16 TFLOP/s per device (H100: measured matmul rate; MI250X:
# datasheet per GCD) for an assumed compute time, devices per node, intra-node all-reduce bus bandwidth
# (GB/s), network per node (Gbit/s), latency per hop between nodes (us), device memory copy (GB/s).
COPY_GBS = 3000.0  # H100 device copy ~3.0 TB/s (docs/performance.md)
CLUSTERS = {
    "h100-ib": {
        "device_tflops": 798.0,
        "gpus_per_node": 8,
        "intra_node_gbs": 360.0,
        "inter_node_gbps": 3200.0,
        "latency_us": 10.0,
        "copy_gbs": COPY_GBS,
    },
    "frontier": {
        "device_tflops": 191.5,
        "gpus_per_node": 8,
        "intra_node_gbs": 100.0,
        "inter_node_gbps": 800.0,
        "latency_us": 10.0,
        "copy_gbs": 1600.0,  # MI250X GCD HBM2e
    },
}


# ---------------------------------------------------------------------------------------------- arithmetic


def stream_elements(num_params: int, num_tensors: int) -> int:
    """fp32 elements the gradient stream reduces per optimizer step: gradients plus one flag per tensor."""
    return int(num_params) + int(num_tensors)


def stream_bytes(num_params: int, num_tensors: int) -> int:
    return 4 * stream_elements(num_params, num_tensors)


def stream_chunks(num_params: int, num_tensors: int, chunk_mb: float) -> int:
    """All-reduce calls per step: the stream cut into chunk_mb MiB pieces (as SimpleFabric.chunk_elements)."""
    chunk = max(1, int(chunk_mb * 2**20) // 4)
    return math.ceil(stream_elements(num_params, num_tensors) / chunk)


def stream_copy_s(nbytes: float, copy_bw: float) -> float:
    """The stream copies every gradient into its buffer and the reduced values back: two passes over the bytes."""
    return 2 * nbytes / copy_bw


def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency_s: float, chunks: int = 1) -> float:
    """Ring all-reduce of nbytes over `ranks` flat ranks at `bandwidth` bytes/s per link, in `chunks` calls."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + chunks * 2 * (ranks - 1) * latency_s


def cluster_allreduce_s(
    nbytes: float,
    nodes: int,
    gpus_per_node: int,
    intra_bw: float,
    inter_bw: float,
    latency_s: float,
    chunks: int,
) -> tuple[float, str]:
    """(seconds, algorithm) for a hierarchical all-reduce; inter_bw is one node's total network bandwidth (B/s)."""
    ranks = nodes * gpus_per_node
    if ranks <= 1:
        return 0.0, "-"
    g, n = gpus_per_node, nodes
    bandwidth = 0.0
    if g > 1:
        bandwidth += 2 * (g - 1) / g * nbytes / intra_bw
    if n > 1:
        bandwidth += 2 * (n - 1) / n * nbytes / inter_bw
    ring = 2 * (ranks - 1) * latency_s
    tree = 2 * math.ceil(math.log2(ranks)) * latency_s
    algo, per_chunk = ("ring", ring) if ring <= tree else ("tree", tree)
    return bandwidth + chunks * per_chunk, algo


@dataclass
class ScalingRow:
    nodes: int
    ranks: int
    accum: int
    compute_s: float
    allreduce_s: float
    algo: str
    step_s: float
    tokens_per_s: float
    efficiency: float  # compute share of the step (1.0 = perfect scaling)


def scaling_rows(
    *,
    micro_step_s: float,
    micro_batch: int,
    block_size: int,
    global_batch: int,
    nbytes: float,
    chunks: int,
    nodes_list: list[int],
    gpus_per_node: int,
    intra_bw: float,
    inter_bw: float,
    latency_s: float,
    copy_bw: float | None = None,
) -> list[ScalingRow]:
    """One row per node count at a fixed global batch (sequences per optimizer step); copy_bw (B/s) adds the
    stream's buffer copies to the all-reduce time when more than one device takes part."""
    rows = []
    for nodes in nodes_list:
        ranks = nodes * gpus_per_node
        accum = max(1, math.ceil(global_batch / (ranks * micro_batch)))
        compute = accum * micro_step_s
        comm, algo = cluster_allreduce_s(nbytes, nodes, gpus_per_node, intra_bw, inter_bw, latency_s, chunks)
        if copy_bw and ranks > 1:
            comm += stream_copy_s(nbytes, copy_bw)
        step = compute + comm
        tokens = accum * ranks * micro_batch * block_size
        rows.append(ScalingRow(nodes, ranks, accum, compute, comm, algo, step, tokens / step, compute / step))
    return rows


def mean_training_flops(config, samples: int = 2000, seed: int = 0) -> float:
    """FLOPs per token averaged over the depth sampler's draws (E[r] is mean_recurrence + 1 for the default scheme)."""
    from recpre.recurrence import sample_depth

    if not config.is_recurrent:
        return float(config.flops_per_token(training=True))
    total = sum(config.flops_per_token(sample_depth(config, i, 0, seed), training=True) for i in range(samples))
    return total / samples


# ---------------------------------------------------------------------------------------------- CPU check

TINY = {  # wide embedding, short sequences: the all-reduce is a real share of the step on a CPU
    "vocab_size": 32768,
    "n_embd": 256,
    "n_heads": 4,
    "intermediate_size": 512,
    "block_size": 32,
    "mean_recurrence": 2,
    "mean_backprop_depth": 1,
    "sampling_scheme": "fixed",
}


def calibrate_stream(fabric, reps: int) -> dict:
    """Latency alpha (per ring hop per chunk) and bandwidth beta of SimpleFabric's gradient stream on this machine.

    Times the stream itself (copies, flags and all) on synthetic gradients where chunk count and bytes vary
    independently (8 chunks of C, 8 chunks of C/64, 1 chunk of 8C; C = fabric.chunk_mb) and fits
    t = chunks x 2 (p-1) alpha + 2 (p-1)/p x bytes / beta by least squares. The training model's layout (size,
    tensor count, chunks) and the 3-process world are then predictions, not fits.
    """
    import torch
    from torch import nn

    world, chunk_mb = fabric.world_size, fabric.chunk_mb
    points = []
    try:
        for mb, n_chunks in ((chunk_mb, 8), (chunk_mb / 64, 8), (chunk_mb * 8, 1)):
            fabric.chunk_mb = mb
            elements = n_chunks * fabric.chunk_elements - 1  # + 1 flag element = n_chunks exactly
            holder = nn.Module()
            holder.p = nn.Parameter(torch.zeros(elements))
            holder.p.grad = torch.ones(elements)
            fabric.all_reduce_gradients(holder)  # builds this layout's stream
            samples = []
            for _ in range(reps):
                fabric.barrier()
                t0 = time.perf_counter()
                fabric.all_reduce_gradients(holder)
                samples.append(time.perf_counter() - t0)
            points.append((stream_chunks(elements, 1, mb), stream_bytes(elements, 1), statistics.median(samples)))
    finally:
        fabric.chunk_mb = chunk_mb
    alpha, beta = fit_ring(points, world)
    return {"alpha": alpha, "beta": beta}


def fit_ring(points: list[tuple[int, float, float]], world: int) -> tuple[float, float]:
    """(alpha, beta) from (chunks, bytes, seconds) measurements: least squares on ring_allreduce_s's formula."""
    import numpy as np

    hop, wire = 2 * (world - 1), 2 * (world - 1) / world
    rows = np.array([(c * hop, b * wire) for c, b, _ in points], dtype=float)
    (alpha, inv_beta), *_ = np.linalg.lstsq(rows, np.array([t for *_, t in points], dtype=float), rcond=None)
    return max(float(alpha), 0.0), 1 / max(float(inv_beta), 1e-15)


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: calibrate gloo (world 2), then time compute / all-reduce / optimizer per step."""
    import torch
    import torch.distributed as dist

    from recpre.config import ModelConfig
    from recpre.fabric import SimpleFabric
    from recpre.model import build_model

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fabric = SimpleFabric(
        SimpleNamespace(
            strategy="simple-ddp" if world > 1 else "single",
            precision="fp32",
            device="cpu",
            chunk_mb=args.chunk_mb,
            timeout_s=600,
        )
    ).launch()
    result: dict = {"world": world, "chunk_mb": args.chunk_mb}
    if world > 1:
        result.update(calibrate_stream(fabric, args.calib_reps))
    config = ModelConfig.from_name("debug-recurrent", **TINY)
    torch.manual_seed(0)
    model = fabric.setup_model(build_model(config))
    params = [p for p in model.parameters() if p.requires_grad]
    result.update(params=sum(p.numel() for p in params), tensors=len(params))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(fabric.rank)
    shape = (args.micro_batch, config.block_size)
    x, y = (
        torch.randint(0, config.vocab_size, shape, generator=g),
        torch.randint(0, config.vocab_size, shape, generator=g),
    )
    rows = []
    for step in range(args.warmup + args.steps):
        fabric.barrier()
        t0 = time.perf_counter()
        model(x, y).loss.backward()
        t1 = time.perf_counter()
        fabric.barrier()  # wait for the slowest rank here, so the all-reduce time is the collective alone
        t2 = time.perf_counter()
        fabric.all_reduce_gradients(model)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step >= args.warmup:
            rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    local = torch.tensor([statistics.median(c) for c in zip(*rows)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    keys = ("compute_s", "wait_s", "allreduce_s", "optim_s", "step_s")
    result.update({k: v.item() for k, v in zip(keys, local)})
    if fabric.rank == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    fabric.teardown()


def measure(world: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__]
    cmd += ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--chunk-mb", str(args.chunk_mb), "--micro-batch", str(args.micro_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.measure_timeout_s, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    raise RuntimeError(f"torchrun with {world} processes gave no result (exit {proc.returncode}):\n{tail}")


def predict_cpu(one: dict, calib: dict, world: int, chunk_mb: float) -> dict:
    """The model's all-reduce and step time at `world` processes from the 1-process run and the calibration."""
    nbytes = stream_bytes(one["params"], one["tensors"])
    chunks = stream_chunks(one["params"], one["tensors"], chunk_mb)
    comm = ring_allreduce_s(nbytes, world, calib["beta"], calib["alpha"], chunks)  # copies are inside beta here
    return {"allreduce_s": comm, "step_s": one["step_s"] + comm, "bytes": nbytes, "chunks": chunks}


def check_on_cpu(args: argparse.Namespace) -> list[dict]:
    runs = {w: measure(w, args) for w in (1, 2, 3)}
    one, calib = runs[1], runs[2]
    load = os.getloadavg()[0]
    print(
        f"\n## CPU check: {TINY['n_embd']}-wide recurrent model, {one['params'] / 1e6:.1f}M params "
        f"({one['tensors']} tensors), micro-batch {args.micro_batch} x {TINY['block_size']} tokens per process, "
        f"gloo, 1 thread per process, chunk {args.chunk_mb:g} MiB, median of {args.steps} steps"
    )
    print(
        f"\ncalibration (the gradient stream on synthetic gradients: 8 x C, 8 x C/64, 1 x 8C; 2 processes): "
        f"alpha {calib['alpha'] * 1e6:.0f} us per ring hop and chunk, effective beta {calib['beta'] / 1e9:.2f} GB/s "
        f"(buffer copies included); {os.cpu_count()} cores, load average {load:.1f}\n"
    )
    print(
        "| processes | compute s | wait for slowest s | all-reduce s (measured) | all-reduce s (model) "
        "| all-reduce error | step s (measured) | step s (model) | step error | step s (model, this run's compute) "
        "| error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    figures = []
    for w, r in runs.items():
        if w == 1:
            pred = {"allreduce_s": 0.0, "step_s": one["step_s"]}
        else:
            pred = predict_cpu(one, calib, w, args.chunk_mb)
        err = r["step_s"] / pred["step_s"] - 1
        comm_err = f"{100 * (r['allreduce_s'] / pred['allreduce_s'] - 1):+.0f}%" if w > 1 else "-"
        # the same formula with this run's own compute and optimizer times: the network part alone
        local = r["compute_s"] + r["optim_s"] + pred["allreduce_s"]
        local_err = r["step_s"] / local - 1
        print(
            f"| {w} | {r['compute_s']:.3f} | {r['wait_s']:.3f} | {r['allreduce_s']:.3f} | {pred['allreduce_s']:.3f} | "
            f"{comm_err} | {r['step_s']:.3f} | {pred['step_s']:.3f} | {100 * err:+.0f}% | {local:.3f} | "
            f"{100 * local_err:+.0f}% |"
        )
        if w > 1:
            figures.append(
                {
                    "name": f"cpu check, {w} processes: all-reduce measured vs model",
                    "value": round(100 * (r["allreduce_s"] / pred["allreduce_s"] - 1), 1),
                    "unit": "%",
                    "note": f"all-reduce {r['allreduce_s']:.3f} s vs {pred['allreduce_s']:.3f} s; step "
                    f"{r['step_s']:.3f} s vs {pred['step_s']:.3f} s (1-process compute), "
                    f"{local:.3f} s (this run's compute)",
                }
            )
    contention = runs[3]["compute_s"] / one["compute_s"]
    print(
        f"\nCompute per process at 3 processes is {contention:.2f}x the 1-process compute: more processes than free "
        "cores (and other jobs) slow the compute itself, which the network model does not include. The all-reduce "
        "model is calibrated on the stream itself at 2 processes; the all-reduce error at 2 processes is the size "
        "and layout extrapolation, at 3 the world-size extrapolation (plus scheduling on busy cores)."
    )
    return figures


# ---------------------------------------------------------------------------------------------- paper model


def paper_model(args: argparse.Namespace) -> list[dict]:
    from recpre.config import ModelConfig
    from recpre.model import build_model

    config = ModelConfig.from_name(args.model)
    params = [p for p in build_model(config, device="meta").parameters() if p.requires_grad]
    num_params, num_tensors = sum(p.numel() for p in params), len(params)
    nbytes = stream_bytes(num_params, num_tensors)
    chunks = stream_chunks(num_params, num_tensors, args.chunk_mb)
    tokens = args.micro_batch * config.block_size
    flops = mean_training_flops(config)
    if args.micro_step_s:
        micro, source = args.micro_step_s, f"measured single-device micro-step {args.micro_step_s:g} s"
    else:
        micro = flops * tokens / (args.device_tflops * 1e12 * args.assumed_mfu)
        source = (
            f"ASSUMED micro-step {micro:.2f} s = {flops / 1e9:.0f} GFLOP/token x {tokens} tokens at "
            f"{100 * args.assumed_mfu:.0f}% of {args.device_tflops:g} TFLOP/s per device (no measured 3.5B step time yet; "
            "pass --micro-step-s)"
        )
    intra, inter = args.intra_node_gbs * 1e9, args.inter_node_gbps * 1e9 / 8
    rows = scaling_rows(
        micro_step_s=micro,
        micro_batch=args.micro_batch,
        block_size=config.block_size,
        global_batch=args.global_batch,
        nbytes=nbytes,
        chunks=chunks,
        nodes_list=args.nodes,
        gpus_per_node=args.gpus_per_node,
        intra_bw=intra,
        inter_bw=inter,
        latency_s=args.latency_us * 1e-6,
        copy_bw=args.copy_gbs * 1e9,
    )
    print(f"## Scaling on paper: {config.name} ({num_params:,} parameters in {num_tensors} tensors)")
    print()
    print(f"- compute: {source}")
    print(
        f"- all-reduce: {nbytes / 1e9:.2f} GB fp32 per step in {chunks} chunks of {args.chunk_mb:g} MiB; "
        f"cluster {args.cluster}: {args.gpus_per_node} devices per node at {args.intra_node_gbs:g} GB/s intra-node bus bandwidth, "
        f"{args.inter_node_gbps:g} Gbit/s network per node, {args.latency_us:g} us per hop, buffer copies at "
        f"{args.copy_gbs:g} GB/s (stated, not measured)"
    )
    print(f"- global batch {args.global_batch} sequences x {config.block_size} tokens, micro-batch {args.micro_batch}")
    print()
    print("| nodes | devices | accum | compute s | all-reduce s | algo | step s | Mtok/s | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.nodes} | {r.ranks} | {r.accum} | {r.compute_s:.2f} | {r.allreduce_s:.3f} | {r.algo} | "
            f"{r.step_s:.2f} | {r.tokens_per_s / 1e6:.2f} | {100 * r.efficiency:.1f}% |"
        )
    last = rows[-1]
    return [
        {"name": f"{config.name} all-reduce bytes/step", "value": nbytes, "unit": "B", "note": f"{chunks} chunks"},
        {
            "name": f"{config.name} scaling efficiency at {last.nodes} nodes",
            "value": round(100 * last.efficiency, 1),
            "unit": "%",
            "note": "assumed compute" if not args.micro_step_s else "measured compute",
        },
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="paper model + CPU check with few steps (run_all --quick)")
    p.add_argument("--full", action="store_true", help="paper model + CPU check with more steps (run_all --full)")
    p.add_argument("--measure", action="store_true", help="run the 1/2/3-process CPU check (implied by --quick/--full)")
    p.add_argument("--model", default="nebel-raven-3.5b")
    p.add_argument("--micro-step-s", type=float, default=None, help="measured single-device micro-step time")
    p.add_argument("--assumed-mfu", type=float, default=0.4, help="for the compute time when none is measured")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=4096, help="sequences per optimizer step (Huginn: 4096)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--cluster", default="h100-ib", choices=sorted(CLUSTERS), help="stated network defaults")
    p.add_argument("--device-tflops", type=float, default=None, help="bf16 TFLOP/s per device (assumed compute)")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--intra-node-gbs", type=float, default=None, help="all-reduce bus bandwidth inside a node, GB/s")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="network bandwidth per node, Gbit/s")
    p.add_argument("--latency-us", type=float, default=None, help="per ring/tree hop between nodes")
    p.add_argument("--copy-gbs", type=float, default=None, help="device memory copy GB/s (the stream's buffer copies)")
    p.add_argument("--chunk-mb", type=float, default=25.0, help="fabric.chunk_mb")
    p.add_argument("--steps", type=int, default=None, help="timed steps per CPU run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calib-reps", type=int, default=10)
    p.add_argument("--measure-timeout-s", type=float, default=240)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in CLUSTERS[args.cluster].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps is None:
        args.steps = 30 if args.full else 10
    if args.micro_step_s is not None and args.micro_step_s <= 0:
        raise UserError(f"--micro-step-s must be positive, got {args.micro_step_s}.")
    if not 0 < args.assumed_mfu <= 1:
        raise UserError(f"--assumed-mfu must lie in (0, 1], got {args.assumed_mfu}.")
    if min(args.nodes) < 1 or args.gpus_per_node < 1 or args.micro_batch < 1 or args.global_batch < 1:
        raise UserError("--nodes, --gpus-per-node, --micro-batch and --global-batch must be positive.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    figures = paper_model(args)
    if args.measure or args.quick or args.full:
        cpu = argparse.Namespace(**{**vars(args), "chunk_mb": 4.0, "micro_batch": 2})
        figures += check_on_cpu(cpu)
    emit_figures("scaling", figures)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
