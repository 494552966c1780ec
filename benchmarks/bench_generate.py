"""Generation speed with and without the KV cache, and adaptive vs fixed recurrence depth at equal quality.

    python benchmarks/bench_generate.py --checkpoint runs/debug              # both parts, CPU
    python benchmarks/bench_generate.py --part speed --batch 4 --new 64     # speed only (fresh debug model)

Speed: greedy decoding of `--new` tokens after a `--prompt`-token prompt, tokens/s over the batch (median of
`--reps`), cached vs uncached (and the bounded cache with --share-every).
Quality: teacher-forced next-token loss on the bundled held-out text (chunks of the run's validation split), token
by token through the KV cache, at fixed depths and with adaptive depth at several thresholds; reports the mean depth
adaptive depth used and the smallest fixed depth that is at least as good.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recpre.errors import UserError, run_cli  # noqa: E402
from recpre.generation import EXIT_CRITERIA  # noqa: E402


def load(args):
    if args.checkpoint:
        from recpre.checkpoint import load_model

        model, settings = load_model(args.checkpoint)
        return model, settings
    from recpre.config import ModelConfig
    from recpre.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig.from_name(args.model)).eval(), None


def bench_speed(model, args) -> list[dict]:
    from recpre.generation import generate

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    rows = []
    variants = [("kv cache", {"use_cache": True}), ("no cache", {"use_cache": False})]
    if model.config.is_recurrent and args.share_every:
        variants.insert(1, (f"shared cache m={args.share_every}", {"use_cache": True, "share_every": args.share_every}))
    for name, kwargs in variants:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = generate(model, prompt, max_new_tokens=args.new, eos_id=-1, num_steps=args.num_steps, **kwargs)
            times.append(time.perf_counter() - t0)
        assert out.shape[1] == args.prompt + args.new
        t = statistics.median(times)
        rows.append({"variant": name, "seconds": t, "tokens_per_s": args.batch * args.new / t})
    return rows


@torch.no_grad()
def teacher_forced(model, docs: list[list[int]], *, num_steps: int, adaptive=None) -> tuple[float, float]:
    """(mean next-token loss in nats, mean depth) decoding each document token by token through the cache."""
    from recpre.generation import RecurrentKVCache, forward_last

    total, count, depth_sum = 0.0, 0, 0
    for doc in docs:
        cache = RecurrentKVCache()
        ids = torch.tensor([doc])
        for t in range(len(doc) - 1):
            logits, used = forward_last(
                model, ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache, num_steps=num_steps,
                adaptive=adaptive,
            )  # fmt: skip
            lp = logits[0].log_softmax(-1)[doc[t + 1]]
            total -= float(lp)
            count += 1
            depth_sum += int(used[0])
    return total / count, depth_sum / count


def bench_depth(model, settings, args) -> dict:
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.tasks import TaskBuild, heldout_chunks, heldout_documents, run_data
    from recpre.generation import AdaptiveDepth

    if settings is None or not model.config.is_recurrent:
        raise UserError("the depth part needs --checkpoint of a trained recurrent model")
    model.config.state_init = "zero"
    tok_dir, val = run_data(settings, model.config)
    tok = load_tokenizer(tok_dir)
    chunks = heldout_chunks(heldout_documents(val, tok), TaskBuild())[: args.docs]
    docs = [([tok.eos_id] + tok.encode(c["text"]))[: min(args.doc_tokens, model.config.block_size)] for c in chunks]
    fixed = {}
    for r in args.depths:
        loss, _ = teacher_forced(model, docs, num_steps=r)
        fixed[r] = loss
        print(f"fixed depth {r:3d}: loss {loss:.4f}", file=sys.stderr)
    adaptive = []
    for thr in args.thresholds:
        rule = AdaptiveDepth(threshold=thr, criterion=args.criterion)
        loss, depth = teacher_forced(model, docs, num_steps=max(args.depths), adaptive=rule)
        equal = min((r for r, v in fixed.items() if v <= loss + 1e-9), default=None)
        adaptive.append({"threshold": thr, "loss": loss, "mean_depth": depth, "fixed_depth_at_equal_loss": equal})
        print(f"adaptive {args.criterion} < {thr:g}: loss {loss:.4f}, mean depth {depth:.2f}", file=sys.stderr)
    tokens = sum(len(d) - 1 for d in docs)
    return {"docs": len(docs), "tokens": tokens, "fixed": fixed, "adaptive": adaptive, "criterion": args.criterion}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (required for the depth part)")
    p.add_argument("--model", default="debug-recurrent", help="registry shape for speed without a checkpoint")
    p.add_argument("--part", choices=["all", "speed", "depth"], default="all")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--share-every", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--depths", default="1,2,4,6,8,12,16")
    p.add_argument("--thresholds", default="0.1,0.03,0.01,0.003")
    p.add_argument("--criterion", choices=list(EXIT_CRITERIA), default="kl")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--doc-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        args.depths = [int(x) for x in args.depths.split(",")]
        args.thresholds = [float(x) for x in args.thresholds.split(",")]
    except ValueError:
        raise UserError("--depths takes integers and --thresholds numbers, comma-separated") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model, settings = load(args)
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": model.config.name,
        "args": {k: v for k, v in vars(args).items()},
    }
    if args.part in ("all", "speed"):
        report["speed"] = bench_speed(model, args)
        print(f"\nspeed (batch {args.batch}, prompt {args.prompt}, new {args.new}, depth {args.num_steps or 'mean'}):")
        for row in report["speed"]:
            print(f"  {row['variant']:<22} {row['tokens_per_s']:9.1f} tokens/s   ({row['seconds']:.2f} s)")
    if args.part in ("all", "depth"):
        d = report["depth"] = bench_depth(model, settings, args)
        print(f"\ndepth ({d['docs']} held-out chunks, {d['tokens']} tokens, teacher forced, zero state):")
        for r, loss in d["fixed"].items():
            print(f"  fixed    r={r:<3}            loss {loss:.4f}")
        for a in d["adaptive"]:
            print(
                f"  adaptive {d['criterion']}<{a['threshold']:<8g} loss {a['loss']:.4f}  mean depth {a['mean_depth']:.2f}"
                f"  (fixed depth reaching that loss: {a['fixed_depth_at_equal_loss']})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
