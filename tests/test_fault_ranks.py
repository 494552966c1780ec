"""A rank of a real 2-process gloo train.py run dies (SIGKILL) or stalls (SIGSTOP): the other exits, no hang.

Both ranks are `python train.py` processes started with torchrun-style variables (no torchrun agent, which
would kill the group itself and hide a stall). Once rank 0 has logged a few steps, one rank is killed or
frozen; the survivor must exit with a non-zero code and a clear message within fabric.timeout_s plus slack.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_args

from recpre.monitor import read_metrics

TIMEOUT_S = 5
SLACK_S = 25  # process teardown on a loaded 2-core machine; a hang would take the whole run (minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(run: Path, corpus, world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    args = tiny_run_args(
        run,
        corpus,
        "train.max_steps=100000",
        "schedule.cooldown_steps=0",
        "checkpoint.interval=0",
        "eval.interval=0",
        f"fabric.timeout_s={TIMEOUT_S}",
    )
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "train.py", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def wait_for_steps(run: Path, procs: list[subprocess.Popen], steps: int, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        if len(rows) >= steps:
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a rank exited early ({p.returncode}): {p.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("the 2-rank run did not reach its first steps")


@pytest.mark.parametrize(
    "victim, how",
    [(1, "die"), (1, "stall"), (0, "die")],
    ids=["rank1-dies", "rank1-stalls", "rank0-dies"],
)
def test_survivor_exits_with_a_clear_error_within_the_timeout(victim, how, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(run, tiny_corpus)
    survivor = procs[1 - victim]
    try:
        wait_for_steps(run, procs, 3)
        t0 = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL if how == "die" else signal.SIGSTOP)
        try:
            _, err = survivor.communicate(timeout=TIMEOUT_S + SLACK_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"rank {1 - victim} still runs {TIMEOUT_S + SLACK_S}s after rank {victim} {how}"
            ) from None
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr and not p.stderr.closed:
                p.stderr.close()
    assert survivor.returncode not in (0, None), err
    assert elapsed < TIMEOUT_S + SLACK_S
    if how == "stall":
        assert elapsed >= TIMEOUT_S - 1, f"a stall can only be told from a slow step by the timeout ({elapsed:.1f}s)"
    assert "another rank died or stalled" in err and f"fabric.timeout_s={TIMEOUT_S}s" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err  # one clear line, not a stack dump
