"""Forward+backward time of every available attention backend, with and without document masks.

    python benchmarks/bench_attention.py                          # CPU, fp32, seq 1024/2048
    python benchmarks/bench_attention.py --gpu                    # cuda, bf16, seq 4096, head dim 96 and 128
    python benchmarks/bench_attention.py --out benchmarks/results/DATE_cpu_attention.md

Figures are medians over --repeats timed runs after --warmup runs. GFLOP/s counts the attention matmuls only
(fwd 4*B*H*S^2*D, fwd+bwd = 3.5x fwd) times the visible fraction of the score matrix (causal, documents), so
a masked call is charged only for the work it needs. Backends that cannot train on the device (flex on CPU)
are timed forward only and say so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recpre.attention as attention  # noqa: E402
from recpre.attention.documents import document_ids  # noqa: E402

CPU_SHAPES = [  # (batch, heads, kv_heads, seq, head_dim)
    (1, 8, 2, 1024, 64),
    (1, 8, 8, 2048, 64),
    (1, 4, 4, 1024, 128),
]
GPU_SHAPES = [
    (1, 55, 55, 4096, 96),  # nebel-raven-3.5b attention
    (2, 32, 8, 4096, 128),  # GQA 4, head dim 128
]


def make_inputs(shape, dtype, device, docs: str, seed: int = 0):
    b, h, kvh, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g).to(device, dtype)
    k = torch.randn(b, kvh, s, d, generator=g).to(device, dtype)
    v = torch.randn(b, kvh, s, d, generator=g).to(device, dtype)
    doc_ids = None
    if docs == "docs":  # ~8 documents of random lengths per row, as in packed pretraining rows
        tokens = torch.randint(1, 1000, (b, s), generator=g)
        tokens[torch.rand(b, s, generator=g) < 8 / s] = 0
        doc_ids = document_ids(tokens, 0).to(device)
    return q, k, v, doc_ids


def visible_fraction(s: int, causal: bool, doc_ids: torch.Tensor | None) -> float:
    if doc_ids is None:
        return (s + 1) / (2 * s) if causal else 1.0
    mask = attention.attention_mask(s, s, causal=causal, doc_ids=doc_ids.cpu(), device=torch.device("cpu"))
    return mask.float().mean().item()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_backend(name, shape, dtype, device, docs, warmup, repeats, causal=True):
    """(milliseconds, mode) where mode is 'fwd+bwd' or 'fwd' (no backward on this device)."""
    q, k, v, doc_ids = make_inputs(shape, dtype, device, docs)
    fn = attention.get(name)
    train = not (name == "flex" and device == "cpu")
    if train:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    dy = torch.randn_like(q)

    def step():
        if train:
            out = fn(q, k, v, causal=causal, doc_ids=doc_ids)
            torch.autograd.grad(out, (q, k, v), dy)
        else:
            with torch.no_grad():
                fn(q, k, v, causal=causal, doc_ids=doc_ids)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, "fwd+bwd" if train else "fwd", doc_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="bf16 on cuda at seq 4096 (default: fp32 on CPU)")
    parser.add_argument("--backends", default="", help="comma list (default: every available backend)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="also write the markdown report here")
    args = parser.parse_args(argv)

    device, dtype, shapes = ("cuda", torch.bfloat16, GPU_SHAPES) if args.gpu else ("cpu", torch.float32, CPU_SHAPES)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA/ROCm device")
    names = args.backends.split(",") if args.backends else attention.available()
    names = [n for n in names if device in attention._BACKENDS[n].devices]

    load_start = os.getloadavg()[0]
    rows = []
    header = ["| backend | shape | docs | timed | median ms | GFLOP/s (visible) |", "|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    best: dict[tuple, tuple[float, str]] = {}  # (shape, docs) -> fastest fwd+bwd (ms, backend)
    for shape in shapes:
        for docs in ("nodoc", "docs"):
            for name in names:
                if docs == "docs" and not attention._BACKENDS[name].documents:
                    continue
                ms, mode, doc_ids = time_backend(name, shape, dtype, device, docs, args.warmup, args.repeats)
                b, h, _, s, d = shape
                flops = 4 * b * h * s * s * d * visible_fraction(s, True, doc_ids) * (3.5 if mode == "fwd+bwd" else 1)
                row = f"| {name} | {shape} | {docs} | {mode} | {ms:.1f} | {flops / ms / 1e6:.2f} |"
                print(row, flush=True)
                rows.append(row)
                if mode == "fwd+bwd" and ms < best.get((shape, docs), (float("inf"), ""))[0]:
                    best[(shape, docs)] = (ms, name)

    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    report = [
        f"# Attention backends, {device} {str(dtype).removeprefix('torch.')}",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine}; {versions}",
        f"- command: `python benchmarks/bench_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}",
        "- shape: (batch, heads, kv_heads, seq, head_dim), causal; docs = ~8 documents per row",
        "",
        *header,
        *rows,
    ]
    from report import emit_figures as emit  # benchmarks/report.py: the line run_all.py collects

    emit(
        "attention",
        [
            {"name": f"fastest fwd+bwd {shape} {docs}", "value": round(ms, 2), "unit": "ms", "note": backend}
            for (shape, docs), (ms, backend) in best.items()
        ],
    )
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
