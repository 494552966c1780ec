"""Chat with a fine-tuned checkpoint in the terminal, through the run's chat template.

    recpre-chat --checkpoint runs/sft-debug                      # interactive; /reset, /depth N, /exit
    recpre-chat --checkpoint runs/sft-debug --adaptive 1e-3      # adaptive exit; mean depth shown per reply
    recpre-chat --checkpoint runs/sft-debug --prompt "What does `json.dumps` do?"   # answer once, for scripts

Replies stream as they are generated; the KV cache is kept across turns, so a turn only processes its own
tokens. `/depth N` sets a fixed recurrence depth (`/depth adaptive` goes back to adaptive exit when
--adaptive was given). (`python evaluate/chat.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
import sys

from recpre.cli.options import add_checkpoint, add_device
from recpre.errors import UserError, run_command
from recpre.generation import EXIT_CRITERIA

HELP = "commands: /reset (forget the conversation), /depth N (fixed recurrence depth), /exit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recpre-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(p)
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--num-steps", type=int, default=None, help="fixed recurrence depth (default: the model's mean)")
    p.add_argument("--adaptive", type=float, default=None, help="adaptive exit below this change between steps")
    p.add_argument("--criterion", choices=list(EXIT_CRITERIA), default="kl", help="adaptive exit criterion")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--chat-template", default=None, help="override the run's data.chat_template")
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        metavar="N",
        help="answer the first N held-out questions of the embedded instruction set and report how many replies "
        "end with the end-of-turn token",
    )
    p.add_argument("--state-init", choices=["zero", "like-init"], default="zero", help="initial recurrent state")
    add_device(p)
    return p.parse_args(argv)


def open_session(args: argparse.Namespace):
    """The checkpoint's model, tokenizer and chat template, as a ChatSession."""
    from recpre.chat_session import ChatSession
    from recpre.checkpoint import load_model
    from recpre.data.chat import special_tokens
    from recpre.data.chat_template import load_chat_template
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.tasks import run_tokenizer
    from recpre.fabric import resolve_device
    from recpre.generation import AdaptiveDepth

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    model, settings = load_model(args.checkpoint, device=resolve_device(args.device))
    if args.adaptive is not None and not model.config.is_recurrent:
        raise UserError("--adaptive applies to recurrent models only; drop it for a GPT checkpoint")
    if model.config.is_recurrent:
        model.config.state_init = args.state_init  # zero: replies do not depend on noise draws
    tokenizer = load_tokenizer(run_tokenizer(settings, model.config))
    template = load_chat_template(args.chat_template or getattr(settings.data, "chat_template", "plain"))
    adaptive = AdaptiveDepth(args.adaptive, args.criterion) if args.adaptive is not None else None
    return ChatSession(
        model, tokenizer, template, special_tokens(tokenizer), num_steps=args.num_steps, adaptive=adaptive,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, system=args.system,
    )  # fmt: skip


def _say(session, text: str) -> None:
    for piece in session.stream(text):
        print(piece, end="", flush=True)
    reply = session.last
    print()
    if session.model.config.is_recurrent:
        mode = "adaptive" if session.adaptive is not None else "fixed"
        print(f"[depth {reply.mean_depth:.2f} ({mode}), {len(reply.tokens)} tokens]", file=sys.stderr, flush=True)


def _command(session, line: str, adaptive) -> bool:
    """Handle a /command; False ends the chat."""
    word, _, rest = line.partition(" ")
    if word == "/exit":
        return False
    if word == "/reset":
        session.reset()
        print("[conversation reset]", file=sys.stderr, flush=True)
    elif word == "/depth" and rest.strip() == "adaptive" and adaptive is not None:
        session.set_depth(None, adaptive)
        print("[depth: adaptive]", file=sys.stderr, flush=True)
    elif word == "/depth" and rest.strip().isdigit() and int(rest) >= 1:
        session.set_depth(int(rest))
        print(f"[depth: {int(rest)}]", file=sys.stderr, flush=True)
    else:
        print(HELP, file=sys.stderr, flush=True)
    return True


def _heldout(session, n: int, cache_dir: str | None) -> None:
    """The end-of-turn figure: of n held-out questions, how many replies end with the end-of-turn token."""
    import json
    from pathlib import Path

    from recpre.data.corpus import default_cache_dir
    from recpre.data.instructions import write_instruction_set

    folder = Path(cache_dir or default_cache_dir()) / f"instructions-{sys.implementation.cache_tag}"
    if not (folder / "val.jsonl").is_file():
        write_instruction_set(folder)
    rows = [json.loads(x) for x in (folder / "val.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    ended = 0
    for row in rows:
        session.reset()
        session.messages = [m for m in row["messages"] if m["role"] == "system"]
        ended += session.reply(row["messages"][1]["content"]).ended
    print(f"held-out: {ended}/{len(rows)} replies end with the end-of-turn token ({100 * ended / len(rows):.0f}%)")


def _run(args: argparse.Namespace) -> int:
    session = open_session(args)
    if args.heldout is not None:
        _heldout(session, args.heldout, None)
        return 0
    if args.prompt is not None:
        _say(session, args.prompt)
        return 0
    adaptive = session.adaptive
    print(f"chat with {args.checkpoint}; {HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, adaptive):
                break
            continue
        print("bot> ", end="", flush=True)
        _say(session, line)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(parse_args(argv)))
