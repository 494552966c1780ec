"""Data throughput: PackedLoader tokens/s per process, and tokenize+pack throughput of the pipeline.

python benchmarks/bench_data.py [--block-size 1024] [--micro-batch 8] [--rows 16384] [--seconds 5]
Writes a synthetic packed dataset (random tokens) in a temp folder, then times the loader as training uses
it (prefetch thread on, plus prefetch=0 for the bare cost), single source and a 2-source mixture. The
pipeline figure tokenizes a slice of the standard library with a freshly trained 4096-token BPE.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(folder: Path, block_size: int, rows: int, seed: int) -> None:
    from recpre.data.packed import PackedWriter

    writer = PackedWriter(folder, block_size, meta={"eos_id": 1, "pad_id": 2, "vocab_size": 65536})
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        writer.add_rows(rng.integers(3, 65536, size=(n, block_size + 1), dtype=np.int32))
    writer.close()


def time_loader(paths, seconds: float, **kw) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process, all threads): the second is robust to
    other processes competing for the cores."""
    from recpre.data.loader import PackedLoader

    loader = PackedLoader(paths, **kw)
    it = iter(loader)
    for _ in range(32):
        next(it)  # warm up: thread start, the first window of every source (a mixture's too)
    n = 0
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        x, y = next(it)
        n += x.numel()
    rate, cpu_rate = n / (time.perf_counter() - start), n / (time.process_time() - cpu)
    loader.close()
    return rate, cpu_rate


def read_amplification(paths, rank: int, **kw) -> float:
    """Rows a rank reads from disk per row it uses, over one epoch: the loader's read locality (1.0 is ideal;
    independent of machine load)."""
    from recpre.data.loader import PackedLoader
    from recpre.data.packed import PackedFile

    read = [0]
    original = PackedFile.read_group

    def counting(self, index):
        rows = original(self, index)
        read[0] += len(rows)
        return rows

    PackedFile.read_group = counting
    try:
        loader = PackedLoader(paths, rank=rank, num_epochs=1, prefetch=0, **kw)
        used = sum(x.shape[0] for x, _ in loader)
    finally:
        PackedFile.read_group = original
    return read[0] / used


def time_pipeline(max_files: int) -> tuple[float, int]:
    from recpre.data.corpus import _read_documents, stdlib_files
    from recpre.data.packed import PackedWriter
    from recpre.data.pipeline import pack_documents
    from recpre.data.tokenizer import tokenizer_info, train_tokenizer

    docs = [t for _, t in _read_documents(stdlib_files(max_files), False)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(docs, 4096, Path(tmp) / "tok")
        writer = PackedWriter(Path(tmp), 1024, meta=tokenizer_info(tok))
        start = time.perf_counter()
        _, n = pack_documents(docs, tok, writer)
        writer.close()
        return n / (time.perf_counter() - start), n


def main() -> None:
    import pyarrow
    import tokenizers
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pipeline-files", type=int, default=300, help="stdlib files for the pipeline figure (0 = skip)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyarrow {pyarrow.__version__}, "
        f"tokenizers {tokenizers.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.mkdir()
        b.mkdir()
        make_data(a, args.block_size, args.rows, 0)
        make_data(b, args.block_size, args.rows // 2, 1)
        kw = {"block_size": args.block_size, "micro_batch_size": args.micro_batch}
        cases = [
            ("single source, prefetch 4", [a], {"prefetch": 4}),
            ("single source, prefetch 0", [a], {"prefetch": 0}),
            ("single source, rank 1 of 2", [a], {"prefetch": 4, "rank": 1, "world_size": 2}),
            ("mixture 0.7/0.3, prefetch 4", [a, b], {"prefetch": 4, "weights": [0.7, 0.3]}),
        ]
        figures = []
        for name, paths, extra in cases:
            rate, cpu_rate = time_loader(paths, args.seconds, **kw, **extra)
            print(
                f"loader  {name:30s} block {args.block_size:5d} mb {args.micro_batch:3d}: {rate / 1e6:7.1f} Mtok/s wall, "
                f"{cpu_rate / 1e6:7.1f} Mtok per CPU-s"
            )
            note = f"{cpu_rate / 1e6:.1f} Mtok per CPU-s; block {args.block_size}, mb {args.micro_batch}"
            figures.append({"name": f"loader {name}", "value": round(rate / 1e6, 2), "unit": "Mtok/s", "note": note})
        for world in (2, 8, 64):
            amp = read_amplification([a], 1, world_size=world, **kw)
            print(
                f"loader  read amplification, rank 1 of {world:3d}, mb {args.micro_batch:3d}: {amp:5.2f} rows read per row used"
            )
            figures.append({"name": f"loader read amplification world {world}", "value": round(amp, 2), "unit": "x"})
    if args.pipeline_files:
        rate, n = time_pipeline(args.pipeline_files)
        print(f"pipeline tokenize+pack ({n / 1e6:.2f}M tokens, vocab 4096, encode_batch): {rate / 1e6:.2f} Mtok/s")
        figures.append({"name": "pipeline tokenize+pack", "value": round(rate / 1e6, 3), "unit": "Mtok/s"})
    from report import emit_figures  # benchmarks/report.py: the line run_all.py collects

    emit_figures("data", figures)


if __name__ == "__main__":
    main()
