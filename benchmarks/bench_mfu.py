"""Training throughput, achieved TFLOP/s, MFU and peak memory of the model in a bare loop: the GPU tuning harness.

    python benchmarks/bench_mfu.py --quick     # CPU: a tiny recurrent model in fp32, checks the machinery (no MFU)
    python benchmarks/bench_mfu.py --full      # GPU: magpie-150m and kolk-raven-1.1b at block 4096, bf16-mixed,
                                               #      eager and compiled per block, best attention, chunked head
    python benchmarks/bench_mfu.py --full --models magpie-150m --compile none,blocks,model --attention sdpa,flash
    python benchmarks/bench_mfu.py --full --models magpie-150m --profile runs/profile   # + torch profiler trace

One row per (model, attention, compile, head): optimizer steps of one micro-batch each, depth (n, k) drawn per step
by the model's sampler (the same draws in every row; `--depth mean` fixes it). FLOPs per step are
`ModelConfig.flops_per_token((n, k))` x tokens at the drawn depth. MFU is achieved FLOP/s over the measured bf16
matmul rate of this project's H100 (798 TFLOP/s; H200 790) and over the datasheet 989 TFLOP/s; with
`--measure-peak` (on by default on a GPU) a third column uses the 8192^3 bf16 matmul rate measured on this
device now. The timed window has no host synchronisation: it is the ceiling the driver can reach.

Compile modes: `none`; `blocks` compiles every transformer block in place (one graph per block shape, whatever
the sampled depth); `model` compiles the whole forward, which unrolls the recurrence, so every new depth is a
new graph: the `graphs` column shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))

from report import emit_figures  # noqa: E402

from recpre.config import ModelConfig  # noqa: E402
from recpre.errors import UserError, run_cli  # noqa: E402
from recpre.flops import PEAKS, device_peak  # noqa: E402

COMPILE_MODES = ("none", "blocks", "model")
FULL_MODELS = ("magpie-150m", "kolk-raven-1.1b")  # the 150M shape and the ~1B recurrent shape (1.28B params)
FULL_MICRO_BATCH = {"magpie-150m": 8, "kolk-raven-1.1b": 1, "corax-raven-800m": 2}
QUICK_OVERRIDES = {"block_size": 64, "n_embd": 64, "n_heads": 2, "intermediate_size": 128}


@dataclass
class Case:
    model: str
    attention: str
    compile: str
    fused_head: str


@dataclass
class Row:
    case: Case
    params: int
    tokens_per_step: int
    tokens_per_s: float = 0.0
    tflops: float = 0.0
    mfu_measured: float | None = None
    mfu_datasheet: float | None = None
    mfu_here: float | None = None
    peak_mem_gib: float | None = None
    warmup_s: float = 0.0
    graphs: int | None = None
    mean_depth: float = 0.0
    status: str = "ok"


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 n^3 matmul rate on this device now (the MFU denominator a tuned kernel can reach)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def apply_compile(model: torch.nn.Module, mode: str, inductor_mode: str | None = None) -> torch.nn.Module:
    if mode == "none":
        return model
    if mode == "model":
        return torch.compile(model, mode=inductor_mode)
    from recpre.model import compile_blocks

    return compile_blocks(model, mode=inductor_mode)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: peak resident set of this process (includes everything before the run)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def run_case(case: Case, args: argparse.Namespace, device: torch.device, here_tflops: float | None) -> Row:
    """Build the model, run warmup + timed steps, return the figures. Each case starts from a clean device."""
    from recpre.model import build_model
    from recpre.optim import build_optimizer
    from recpre.recurrence import sample_depth

    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.block_size:
        overrides["block_size"] = args.block_size
    config = ModelConfig.from_name(
        case.model,
        **overrides,
        attention=case.attention,
        fused_head=case.fused_head,
        activation_checkpointing=args.activation_checkpointing,
    )
    mb = args.micro_batch or (FULL_MICRO_BATCH.get(case.model, 1) if not args.quick else 2)
    row = Row(case, config.num_params(), mb * config.block_size)
    if case.compile != "none":
        torch._dynamo.reset()  # drop graphs (and the models they hold) of earlier cases
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(config, device=device)
    if args.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.train()
    optimizer = build_optimizer(model, SimpleNamespace(name=args.optimizer, lr=1e-4, weight_decay=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    model = apply_compile(model, case.compile, args.inductor_mode)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    g = torch.Generator().manual_seed(1)
    shape = (mb, config.block_size)
    x = torch.randint(0, config.vocab_size, shape, generator=g).to(device)
    y = torch.randint(0, config.vocab_size, shape, generator=g).to(device)
    total = args.warmup + args.steps
    normalizer = float(x.numel()) if args.normalizer == "float" else None  # train.py passes a float
    depths = [
        sample_depth(config, i, 0, 0)
        if args.depth == "sampled"
        else (max(config.mean_recurrence - config.mean_backprop_depth, 0), config.mean_backprop_depth)
        for i in range(total)
    ]

    def step(n: int, k: int) -> None:
        with autocast:
            loss = model(x, y, num_steps=(n, k), loss_normalizer=normalizer).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # a tensor: no host sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    graphs0 = dynamo_graphs()
    t0 = time.perf_counter()
    for n, k in depths[: args.warmup]:
        step(n, k)
    sync()
    row.warmup_s = time.perf_counter() - t0
    timed = depths[args.warmup :]
    t0 = time.perf_counter()
    for n, k in timed:
        step(n, k)
    sync()
    elapsed = time.perf_counter() - t0
    if args.profile:
        profile(step, timed, case, args, device)
    graphs1 = dynamo_graphs()
    row.graphs = graphs1 - graphs0 if graphs0 is not None and graphs1 is not None else None
    flops = sum(config.flops_per_token((n, k), training=True) for n, k in timed) * row.tokens_per_step
    row.tokens_per_s = len(timed) * row.tokens_per_step / elapsed
    row.tflops = flops / elapsed / 1e12
    row.mean_depth = statistics.mean(n + k for n, k in timed)
    _, peak = device_peak(device)
    if peak is not None:
        row.mfu_datasheet = row.tflops / peak.datasheet_tflops
        row.mfu_measured = row.tflops / peak.measured_tflops if peak.measured_tflops else None
    if here_tflops:
        row.mfu_here = row.tflops / here_tflops
    row.peak_mem_gib = peak_memory_gib(device)
    return row


def profile(step, depths, case: Case, args: argparse.Namespace, device: torch.device) -> None:
    """Three more steps under torch.profiler: a Chrome trace per case and the top ops by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for n, k in depths[:3]:
            step(n, k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    name = f"{case.model}_{case.attention}_{case.compile}_{case.fused_head}".replace("/", "-")
    trace = out / f"{name}.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile {name} (3 steps), trace {trace}:\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="CPU: tiny shape, fp32, eager, few steps")
    scale.add_argument("--full", action="store_true", help="GPU: the 150M and ~1B shapes at block 4096 (default)")
    p.add_argument("--models", default=None, help=f"comma list of registry names (default {','.join(FULL_MODELS)})")
    p.add_argument("--attention", default="auto", help="comma list of backends; auto = the best one here")
    p.add_argument(
        "--compile",
        default=None,
        help=f"comma list of {', '.join(COMPILE_MODES)} (full: none,blocks: before and after)",
    )
    p.add_argument("--inductor-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--fused-head", default=None, help="comma list of none, chunked (full: chunked)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16-mixed", "bf16-true"))
    p.add_argument("--optimizer", default="adamw", help="adamw | ellis-adam | muon (recpre.optim)")
    p.add_argument("--block-size", type=int, default=None, help="override the shape's context (full: its own 4096)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default per model)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--depth", default="sampled", choices=("sampled", "mean"))
    p.add_argument(
        "--normalizer",
        default="float",
        choices=("float", "none"),
        help="loss normalizer as train.py passes it (a float) or none (the model counts targets)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (quick 3, full 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compile included (quick 1, full 10)")
    p.add_argument("--measure-peak", choices=("auto", "yes", "no"), default="auto", help="time a bf16 8192^3 matmul")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a torch profiler trace per case here")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda for --full, cpu for --quick)")
    args = p.parse_args(argv)
    full = not args.quick
    args.models = [m for m in (args.models or ("debug-recurrent" if args.quick else ",".join(FULL_MODELS))).split(",")]
    args.compile = (args.compile or ("none,blocks" if full else "none")).split(",")
    args.fused_head = (args.fused_head or ("chunked" if full else "none")).split(",")
    args.attention = args.attention.split(",")
    args.precision = args.precision or ("bf16-mixed" if full else "fp32")
    args.steps = args.steps or (30 if full else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if full else 1)
    args.device = args.device or ("cuda" if full else "cpu")
    for c in args.compile:
        if c not in COMPILE_MODES:
            raise UserError(f"--compile takes {', '.join(COMPILE_MODES)}, not '{c}'.")
    for h in args.fused_head:
        if h not in ("none", "chunked"):
            raise UserError(f"--fused-head takes none or chunked, not '{h}'.")
    for m in args.models:
        ModelConfig.from_name(m)  # unknown names are UserErrors with close matches
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here: run --full on a GPU machine, or --quick (or --device cpu) on a CPU.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    import recpre.attention as attention

    here = None
    if device.type == "cuda" and args.measure_peak in ("auto", "yes"):
        here = matmul_tflops(device)
    elif args.measure_peak == "yes":
        raise UserError("--measure-peak yes needs a CUDA device.")
    device_name, peak = device_peak(device)
    cases = [
        Case(m, a, c, h) for m in args.models for a in args.attention for c in args.compile for h in args.fused_head
    ]
    print(f"# bench_mfu: {device_name}, {args.precision}, torch {torch.__version__}")
    print()
    auto = attention.resolve_auto(device.type)
    print(f"- attention auto -> {auto}; available: {', '.join(attention.available())}")
    if peak is not None:
        print(
            f"- peak: {peak.datasheet_tflops:g} TFLOP/s datasheet, {peak.measured_tflops or 'n/a'} measured (docs/performance.md)"
        )
    if here:
        print(f"- bf16 matmul 8192^3 measured now: {here:.0f} TFLOP/s")
    print(f"- {args.warmup} warmup + {args.steps} timed steps per case, depth {args.depth}, optimizer {args.optimizer}")
    print()
    rows = []
    for case in cases:
        try:
            row = run_case(case, args, device, here)
        except torch.cuda.OutOfMemoryError:
            row = Row(case, ModelConfig.from_name(case.model).num_params(), 0, status="out of memory")
        except Exception as err:  # one broken case (a backend, a compile failure) must not hide the others
            row = Row(
                case, ModelConfig.from_name(case.model).num_params(), 0, status=f"{type(err).__name__}: {err}"[:160]
            )
        rows.append(row)
        print(
            f"[bench_mfu] {case.model} {case.attention} compile={case.compile} head={case.fused_head}: "
            f"{row.status}, {row.tokens_per_s:,.0f} tok/s, {row.tflops:.3g} TFLOP/s",
            file=sys.stderr,
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        "| model | params | attention | compile | head | tokens/step | tokens/s | TFLOP/s | MFU (measured peak) "
        "| MFU (datasheet) | MFU (matmul now) | peak mem GiB | warmup s | graphs | mean depth | status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    figures = []
    for r in rows:
        c = r.case
        mem = "n/a" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}"
        attn = f"auto ({auto})" if c.attention == "auto" else c.attention
        print(
            f"| {c.model} | {r.params / 1e6:.3g}M | {attn} | {c.compile} | {c.fused_head} | {r.tokens_per_step} | "
            f"{r.tokens_per_s:,.0f} | {r.tflops:.3g} | {fmt_pct(r.mfu_measured)} | {fmt_pct(r.mfu_datasheet)} | "
            f"{fmt_pct(r.mfu_here)} | {mem} | {r.warmup_s:.0f} | {r.graphs if r.graphs is not None else 'n/a'} | "
            f"{r.mean_depth:.1f} | {r.status} |"
        )
        if r.status != "ok":
            continue
        label = f"{c.model} {attn} compile={c.compile} head={c.fused_head}"
        note = f"{r.tokens_per_step} tokens/step, mean depth {r.mean_depth:.1f}, graphs {r.graphs}"
        figures.append({"name": f"{label} tokens/s", "value": sig(r.tokens_per_s), "unit": "tok/s", "note": note})
        figures.append({"name": f"{label} achieved", "value": sig(r.tflops), "unit": "TFLOP/s"})
        if r.mfu_measured is not None:
            figures.append(
                {"name": f"{label} MFU vs measured peak", "value": round(100 * r.mfu_measured, 1), "unit": "%"}
            )
        if r.mfu_datasheet is not None:
            figures.append({"name": f"{label} MFU vs datasheet", "value": round(100 * r.mfu_datasheet, 1), "unit": "%"})
        if r.peak_mem_gib is not None:
            note = "process peak RSS" if device.type == "cpu" else "max allocated"
            figures.append({"name": f"{label} peak memory", "value": sig(r.peak_mem_gib), "unit": "GiB", "note": note})
    if device.type == "cpu":
        print("\nCPU run: checks the harness only; MFU needs a GPU (`python benchmarks/bench_mfu.py --full`).")
    known = ", ".join(f"{k} {v.datasheet_tflops:g}/{v.measured_tflops or '-'}" for k, v in PEAKS.items())
    print(f"Known peaks (bf16 TFLOP/s, datasheet/measured): {known}")
    emit_figures("mfu", figures)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
