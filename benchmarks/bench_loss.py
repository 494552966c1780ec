"""Time and peak memory of the LM-head loss: fused (chunked) vs naive vs other backends.

CPU peak memory is the kernel's peak-RSS counter (write 5 to /proc/self/clear_refs, read VmHWM), measured
in a fresh subprocess per implementation so two measurements never share a heap. On a GPU the peak is
torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/bench_loss.py                      # CPU, N=8192 d=512 V=32768 fp32
    python benchmarks/bench_loss.py --sweep-chunks 256,512,1024  # CPU chunk sweep for the default
    python benchmarks/bench_loss.py --gpu                # bf16 N=16384 d=2048 V=65536 on cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpre.ops import default_chunk_size, fused_linear_cross_entropy, naive_linear_cross_entropy  # noqa: E402

IMPLS = ("naive", "fused", "torch", "liger", "cce")


def rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[: n // 10] = -100
    return hidden, weight, targets


def loss_fn(impl: str, chunk: int | None):
    if impl == "naive":
        return lambda h, w, t: naive_linear_cross_entropy(h, w, t)
    if impl == "fused":
        return lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk)
    return lambda h, w, t: other_loss(impl, h, w, t)


def other_loss(impl: str, hidden, weight, targets):
    """Other stacks' fused losses, for comparison only (mean over non-ignored targets, no z-loss)."""
    if impl == "torch":
        fn, opts = (
            getattr(torch.nn.functional, "linear_cross_entropy", None),
            getattr(torch.nn, "LinearCrossEntropyOptions", None),
        )
        if fn is None or opts is None:
            raise ImportError("impl 'torch' needs torch.nn.functional.linear_cross_entropy (torch >= 2.13)")
        return fn(hidden, weight, targets, reduction="mean", ignore_index=-100, options=opts())
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean")
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", shift=False)
    raise ValueError(f"unknown loss implementation {impl!r}")


def step(fn, hidden, weight, targets) -> float:
    hidden.grad = None
    weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return float(loss.detach())


def worker(args) -> dict:
    """One implementation in this process: returns time and peak memory as a dict."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    hidden, weight, targets = make_inputs(args.n, args.d, args.v, dtype, args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.mode == "memory":
        fn = loss_fn(args.impl, args.chunk)
        # grads are allocated once so both paths pay for them outside the measured window
        step(fn, hidden, weight, targets)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            rss_reset()
            base = rss_kib("VmRSS") * 1024
        step(fn, hidden, weight, targets)
        sync()
        peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
        return {"impl": args.impl, "extra_peak_mib": (peak - base) / 2**20}
    # time mode: every implementation named in --impl (comma list) in this one process, interleaved rep by
    # rep, so load from other processes on a shared machine hits all of them alike
    impls = args.impl.split(",")
    fns = {name: loss_fn(name.split("@")[0], int(name.split("@")[1]) if "@" in name else args.chunk) for name in impls}
    times: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.reps):
        for name, f in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = step(f, hidden, weight, targets)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "cpu_s": statistics.median(cpu[name]),
            "loss": losses[name],
        }
        for name, t in times.items()
    }


def run_sub(args, impl: str, mode: str, chunk: int | None) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--mode", mode]
    cmd += ["--n", str(args.n), "--d", str(args.d), "--v", str(args.v), "--dtype", args.dtype]
    cmd += ["--device", args.device, "--reps", str(args.reps), "--warmup", str(args.warmup)]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{impl} {mode}: failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="bf16, N=16384 d=2048 V=65536 on cuda")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: recpre's default)")
    p.add_argument("--impls", default="naive,fused,torch,liger,cce")
    p.add_argument("--sweep-chunks", default="", help="time fused at these chunk sizes, e.g. 256,512,1024")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.gpu
    args.n = args.n or (16384 if gpu else 8192)
    args.d = args.d or (2048 if gpu else 512)
    args.v = args.v or (65536 if gpu else 32768)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.device = args.device or ("cuda" if gpu else "cpu")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA device; run without --gpu for the CPU benchmark")
    print(f"# bench_loss {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus; python {platform.python_version()}")
    print(f"torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}")
    if args.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    default = default_chunk_size(args.n, args.v, args.device)
    print(f"shape: N={args.n} d={args.d} V={args.v} {args.dtype} on {args.device}; default chunk {default}")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    if args.sweep_chunks:
        names = ["naive"] + [f"fused@{c}" for c in args.sweep_chunks.split(",")]
    else:
        names = []
        for impl in args.impls.split(","):
            if impl not in IMPLS:
                sys.exit(f"error: --impls takes names from {IMPLS}, not {impl!r}")
            if impl in ("naive", "fused") or probe(impl, args):
                names.append(f"fused@{args.chunk or default}" if impl == "fused" else impl)
            else:
                print(f"skipped {impl}: not usable here")
    timed = run_sub(args, ",".join(names), "time", None) or {}
    base = timed.get("naive")
    print(
        "\n| impl | median fwd+bwd s | min s | median vs naive | median CPU s | CPU vs naive | extra peak MiB | loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    figures = []
    for name in names:
        r = timed.get(name)
        if r is None:
            continue
        impl, _, chunk = name.partition("@")
        m = None if args.no_memory else run_sub(args, impl, "memory", int(chunk) if chunk else None)
        rel = f"{r['median_s'] / base['median_s']:.2f}x" if base else "-"
        crel = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base else "-"
        mem = f"{m['extra_peak_mib']:.0f}" if m else "-"
        label = f"fused chunk={chunk}" if chunk else impl
        times = f"{r['median_s']:.3f} | {r['min_s']:.3f} | {rel} | {r['cpu_s']:.3f} | {crel}"
        print(f"| {label} | {times} | {mem} | {r['loss']:.5f} |", flush=True)
        figures.append({"name": f"{label} fwd+bwd", "value": round(r["median_s"], 4), "unit": "s"})
        if m:
            figures.append({"name": f"{label} extra peak", "value": round(m["extra_peak_mib"], 1), "unit": "MiB"})
    from report import emit_figures  # benchmarks/report.py: the line run_all.py collects

    emit_figures("loss", figures)


def probe(impl: str, args) -> bool:
    """Whether a backend runs at all here (tiny call), so a missing optional one is skipped, not fatal."""
    try:
        h, w, t = make_inputs(8, 16, 32, getattr(torch, args.dtype), args.device)
        step(loss_fn(impl, None), h, w, t)
        return True
    except (ImportError, ValueError, RuntimeError, NotImplementedError):
        return False


if __name__ == "__main__":
    main()
