"""A rank of a real 2-process gloo train.py run dies (SIGKILL) or stalls (SIGSTOP): the other exits, no hang.

Both ranks are `python train.py` processes started with torchrun-style variables (no torchrun agent, which
would kill the group itself and hide a stall). Once rank 0 has logged a few steps, one rank is killed or
frozen; the survivor must exit with a non-zero code and a clear message within fabric.timeout_s plus slack.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_args

from recpre.checkpoint import find_latest, list_checkpoints
from recpre.monitor import read_metrics

TIMEOUT_S = 5
MARGIN_S = 5  # the error, teardown and exit on a loaded 2-core machine; a hang would take the whole run (minutes)
HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(run: Path, corpus, world: int = 2, *, interval: int = 0, dies_in_save: int | None = None):
    """Both ranks as `python train.py` processes; rank `dies_in_save` kills itself while writing its rank file."""
    port = free_port()
    args = tiny_run_args(
        run,
        corpus,
        "train.max_steps=100000",
        "schedule.cooldown_steps=0",
        f"checkpoint.interval={interval}",
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
        driver = [str(HERE), "die-in-save"] if rank == dies_in_save else ["train.py"]
        procs.append(
            subprocess.Popen(
                [sys.executable, *driver, *args],
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


def message_of(err: str, rank: int) -> str:
    """The one error line of a rank's stderr, which must be the promised message for that rank."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err  # one clear line, not a stack dump
    promised = rf"^error: .+ failed on rank {rank} of 2: another rank died or stalled for longer than "
    assert re.match(promised + rf"fabric\.timeout_s={TIMEOUT_S}s \(.+\)$", last), last
    return last


def wait_for_exit(proc: subprocess.Popen, limit_s: float, what: str) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: still running {limit_s:.0f}s later") from None
    return err, time.monotonic() - t0


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stderr and not p.stderr.closed:
            p.stderr.close()


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
        os.kill(procs[victim].pid, signal.SIGKILL if how == "die" else signal.SIGSTOP)
        err, elapsed = wait_for_exit(survivor, TIMEOUT_S + MARGIN_S, f"rank {1 - victim} after rank {victim} {how}")
    finally:
        stop_all(procs)
    assert survivor.returncode not in (0, None), err
    assert elapsed < TIMEOUT_S + MARGIN_S
    if how == "stall":
        assert elapsed >= TIMEOUT_S - 1, f"a stall can only be told from a slow step by the timeout ({elapsed:.1f}s)"
    message_of(err, 1 - victim)


@pytest.mark.slow
def test_a_rank_that_dies_inside_a_checkpoint_save_fails_the_other_in_the_save_barrier(tiny_corpus, tmp_path):
    """Rank 1 dies while writing its rank file of the step-4 save; rank 0 has written its files and waits for it
    in the save's barrier: it must fail there within the timeout, and `latest` keeps naming step 2."""
    run = tmp_path / "run"
    procs = start_ranks(run, tiny_corpus, interval=2, dies_in_save=1)
    try:
        err, elapsed = wait_for_exit(procs[0], 60 + TIMEOUT_S + MARGIN_S, "rank 0 after rank 1 died in a save")
        procs[1].wait(timeout=10)
    finally:
        stop_all(procs)
    assert procs[1].returncode == -signal.SIGKILL, "rank 1 must have died inside the save of step 4"
    assert procs[0].returncode not in (0, None), err
    assert message_of(err, 0).startswith("error: barrier failed on rank 0 of 2"), err
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]
    assert (root / ".tmp-step-00000004" / "model.safetensors").is_file()  # rank 0 got that far: never a checkpoint
    assert find_latest(root).name == "step-00000002"


def _die_in_save(step: int) -> None:
    """Child mode: SIGKILL this process when it writes its rank file of the save of `step`."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if f"step-{step:08d}" in str(f) and "rank-" in Path(str(f)).name:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    _die_in_save(4)
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
