"""Sample text from a checkpoint: one prompt, or an interactive loop that keeps the conversation as context.

    recpre-generate --checkpoint runs/debug --prompt "def fib(n):" --max-new-tokens 64
    recpre-generate --checkpoint runs/debug --prompt "import" --num-steps 1,4,16   # one completion per depth
    recpre-generate --checkpoint runs/debug --num-steps 16 --temperature 0.8 --top-p 0.9
    recpre-generate --checkpoint runs/debug --prompt "import" --adaptive 1e-3   # adaptive depth
    recpre-generate --checkpoint runs/debug          # interactive: empty line or Ctrl-D ends

(`python evaluate/generate.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
import sys

from recpre.cli.options import add_checkpoint, add_device, add_num_steps
from recpre.errors import UserError, run_command
from recpre.generation import EXIT_CRITERIA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recpre-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(p)
    p.add_argument("--prompt", default=None, help="prompt text (omit for an interactive loop)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_num_steps(p, "several: one completion per depth")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every token")
    p.add_argument("--adaptive", type=float, default=None, help="adaptive depth: stop iterating below this change")
    p.add_argument("--criterion", choices=list(EXIT_CRITERIA), default="kl", help="adaptive exit criterion")
    p.add_argument("--share-every", type=int, default=None, help="bounded cache: m core slots per block")
    p.add_argument("--state-init", choices=["zero", "like-init"], default="zero", help="initial recurrent state")
    add_device(p)
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must lie in (0, 1]")
    from recpre.checkpoint import load_model
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.tasks import run_tokenizer
    from recpre.fabric import resolve_device
    from recpre.generation import AdaptiveDepth, generate_with_info

    model, settings = load_model(args.checkpoint, device=resolve_device(args.device))
    depths = args.num_steps or [None]
    if model.config.is_recurrent:
        model.config.state_init = args.state_init
    tokenizer = load_tokenizer(run_tokenizer(settings, model.config))
    adaptive = AdaptiveDepth(args.adaptive, args.criterion) if args.adaptive is not None else None

    def complete(text: str, num_steps: int | None) -> tuple[str, float]:
        ids = tokenizer.encode(text) or [tokenizer.eos_id]
        ids = ids[-max(1, model.config.block_size - args.max_new_tokens) :]
        out = generate_with_info(
            model, [ids], max_new_tokens=args.max_new_tokens, num_steps=num_steps,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            use_cache=not args.no_cache, eos_id=tokenizer.eos_id, stop=args.stop or None, decode=tokenizer.decode,
            adaptive=adaptive, share_every=args.share_every,
        )  # fmt: skip
        new = out.new_tokens[0]
        if new and new[-1] == tokenizer.eos_id:
            new = new[:-1]
        text = tokenizer.decode(new)
        for s in args.stop:
            text = text.split(s)[0]
        return text, out.mean_depth

    def report(depth: float) -> None:
        if adaptive is not None:
            print(f"[mean recurrence depth used: {depth:.2f}]", file=sys.stderr)

    if args.prompt is not None:
        for num_steps in depths:
            text, depth = complete(args.prompt, num_steps)
            if len(depths) > 1:
                print(f"[num_steps {num_steps}]")
            print(args.prompt + text)
            report(depth)
        return 0
    history = ""
    print("interactive: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history += line + "\n"
        text, depth = complete(history, depths[0])
        print(text)
        report(depth)
        history += text + "\n"
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(parse_args(argv)))
