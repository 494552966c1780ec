"""The chat command: multi-turn through the template with the KV cache kept across turns, depth commands,
and --prompt for scripts. A seconds-long SFT run of a tiny model gives the checkpoint."""

from __future__ import annotations

import subprocess
import sys

from recpre.chat_session import ChatSession
from recpre.cli.chat import open_session, parse_args
from tests.conftest import REPO


def session(run, *extra: str) -> ChatSession:
    return open_session(parse_args(["--checkpoint", str(run), "--device", "cpu", "--max-new-tokens", "6", *extra]))


def test_second_turn_reuses_the_cache_and_matches_a_fresh_prefill(sft_run):
    """Turn two sees turn one (the history is in the prompt) and feeds only its new tokens to the kept cache;
    its reply equals that of a session that prefills the whole history from scratch."""
    chat = session(sft_run, "--num-steps", "2")
    first = chat.reply("What is 3?")
    cached = list(chat.fed)
    second = chat.reply("And what is 4?")
    assert chat.messages[0]["content"] == "What is 3?" and chat.messages[1]["content"] == first.text
    assert cached and chat.fed[: len(cached)] == cached and chat.rebuilds == 0  # only the new tokens were fed
    fresh = session(sft_run, "--num-steps", "2")
    fresh.messages = [*chat.messages[:2]]
    fresh_second = fresh.reply("And what is 4?")
    assert fresh_second.tokens == second.tokens
    assert len(fresh.fed) == len(chat.fed)  # same tokens in both caches


def test_depth_command_changes_the_reported_depth(sft_run):
    chat = session(sft_run, "--adaptive", "1e-9")
    assert chat.reply("What is 5?").mean_depth > 1
    chat.set_depth(1)
    assert chat.reply("What is 6?").mean_depth == 1
    chat.reset()
    assert chat.messages == [] and chat.fed == []


def test_prompt_answers_once_for_scripts(sft_run):
    cmd = [sys.executable, str(REPO / "evaluate" / "chat.py"), "--checkpoint", str(sft_run), "--device", "cpu"]
    done = subprocess.run([*cmd, "--prompt", "What is 7?", "--max-new-tokens", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[depth 3.00 (fixed)" in done.stderr  # the tiny model's mean recurrence
    bad = subprocess.run([*cmd, "--prompt", "x", "--max-new-tokens", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-new-tokens" in bad.stderr
