"""Review findings: the requeue decision on multi-rank runs, the token budget after a batch-size change on
resume, and checkpoint re-save / retention holes. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre import checkpoint as ckpt_mod
from recpre.checkpoint import (
    LATEST,
    MANIFEST_FILE,
    find_latest,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from recpre.monitor import read_metrics
from recpre.preemption import REASON_TERM, REASON_TIME, REASON_USR2, StopRequest
from recpre.schedules import BatchPlan

# -- 1. requeue decision over ranks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reasons", "agreed"),
    [
        ([None, REASON_TIME], REASON_TIME),  # only rank 1 saw the deadline (rank 0 has no reason)
        ([REASON_TERM, REASON_TIME], REASON_TIME),  # time wins: the run is unfinished and must requeue
        ([REASON_TIME, REASON_TERM, None], REASON_TIME),
        ([None, REASON_USR2], REASON_USR2),
        ([REASON_TERM, None], REASON_TERM),
        ([None, None], None),
    ],
)
def test_agreed_reason_is_the_max_over_ranks(reasons, agreed):
    from recpre.preemption import agreed_reason, stop_code

    assert agreed_reason(reasons) == agreed
    assert stop_code(REASON_TIME) > stop_code(REASON_TERM) > stop_code(None) == 0


def test_rank0_without_a_reason_requeues_after_agreeing_on_time():
    from recpre.preemption import stop_code

    calls = []

    def runner(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    rank0, rank1 = StopRequest(job_id="42"), StopRequest(job_id="42")
    rank1.request(REASON_TIME)
    code = max(stop_code(rank0.reason), stop_code(rank1.reason))  # what fabric.all_reduce(op="max") gives
    assert rank0.agree(code) == REASON_TIME and rank0.wants_requeue
    assert rank0.requeue(runner=runner) and calls == [["scontrol", "requeue", "42"]]
    term = StopRequest(job_id="42")
    term.request(REASON_TERM)
    assert term.agree(stop_code(REASON_TERM)) == REASON_TERM and not term.wants_requeue


def test_sigusr1_is_handled_like_sigusr2():
    from recpre.preemption import REASON_USR1

    stop = StopRequest(job_id="7")
    assert stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.uninstall()
    assert stop.requested and stop.reason == REASON_USR1 and stop.wants_requeue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_run_requeues_when_only_rank1_sees_the_deadline(tiny_corpus, tmp_path):
    """Real 2-process gloo train.py: rank 1's (stale) end time has passed, rank 0's has not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    fake = bin_dir / "scontrol"  # records requeues; "show job" fails so rank 0 reads SLURM_JOB_END_TIME
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = requeue ]\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    run = tmp_path / "run"
    args = tiny_run_args(
        run, tiny_corpus, "train.max_steps=50", "checkpoint.interval=0", "eval.interval=0", "fabric.timeout_s=30"
    )
    args = [a for a in args if not a.startswith("checkpoint.save_before_end_min")]
    args.append("checkpoint.save_before_end_min=1")
    now, port = time.time(), _free_port()
    procs = []
    for rank, end in ((0, now + 10 * 86400), (1, now)):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "42",
            "SLURM_JOB_END_TIME": str(int(end)),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
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
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=240)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    stopped = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "stopped"]
    assert stopped and stopped[0]["reason"] == REASON_TIME and stopped[0]["step"] < 50
    assert log.is_file() and "requeue 42" in log.read_text().splitlines(), errs


# -- 2. max_tokens after resuming with another world batch size ----------------------------------------


def _train(plan: BatchPlan, max_tokens: int, step: int, tokens: int) -> tuple[int, int, list[int]]:
    """The driver's loop: (steps, tokens) at the end and the micro-batches of each step."""
    total = plan.total_steps(None, max_tokens, start_step=step, start_tokens=tokens)
    accums = []
    while step < total:
        accum = plan.accumulation_steps_within(step, max_tokens, tokens)
        assert accum > 0
        accums.append(accum)
        tokens += accum * plan.unit_tokens
        step += 1
    assert plan.accumulation_steps_within(step, max_tokens, tokens) == 0
    return step, tokens, accums


@pytest.mark.parametrize("budget_units", [20, 19, 13])
def test_budget_after_a_batch_size_change_counts_the_tokens_already_trained(budget_units):
    first = BatchPlan(8, 2, 1, block_size=8)  # 4 micro-batches per step
    unit = first.unit_tokens
    done = 3 * first.tokens_in_step(0)  # 3 steps = 12 units trained under the first plan
    second = BatchPlan(4, 2, 1, block_size=8)  # resumed with half the world batch: 2 per step
    max_tokens = budget_units * unit
    left = budget_units - 12
    expected_steps = 3 + -(-left // 2)
    assert second.total_steps(None, max_tokens, start_step=3, start_tokens=done) == expected_steps
    steps, tokens, accums = _train(second, max_tokens, 3, done)
    assert steps == expected_steps and tokens == max_tokens
    assert accums[:-1] == [2] * (len(accums) - 1) and accums[-1] == (2 if left % 2 == 0 else 1)
    # max_steps still counts from step 0 and the first of the two wins
    assert second.total_steps(4, max_tokens, start_step=3, start_tokens=done) == 4


def test_budget_after_a_change_into_a_ramp_and_unchanged_plans_agree():
    plan = BatchPlan(16, 2, 1, block_size=8, ramp_steps=6, ramp_start_batch_size=2)
    max_tokens = 41 * plan.unit_tokens
    fresh = plan.total_steps(None, max_tokens)
    for step in range(fresh + 1):  # resuming under the same plan changes nothing
        assert plan.total_steps(None, max_tokens, start_step=step, start_tokens=plan.tokens_before(step)) == fresh
    # resumed at step 2 (still in the ramp) after 10 units under a bigger batch
    steps, tokens, accums = _train(plan, max_tokens, 2, 10 * plan.unit_tokens)
    assert tokens == max_tokens and accums[0] == plan.accumulation_steps(2)
    # a budget already spent: no more steps
    assert plan.total_steps(None, max_tokens, start_step=9, start_tokens=max_tokens) == 9


def test_train_resumed_with_a_smaller_world_batch_stops_at_the_budget(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    unit = 2 * 32  # micro-batch x block size
    budget = 20 * unit
    common = (
        "train.max_steps=null",
        f"train.max_tokens={budget}",
        "eval.interval=0",
        "checkpoint.interval=0",
        "schedule.warmup_steps=1",
    )
    # the first part: 3 steps of 4 micro-batches (12 units), cut short by a step limit
    first = tiny_run_args(run, tiny_corpus, *common, "train.world_batch_size=8", "train.max_steps=3")
    assert train_module.main(first) == 0
    # resumed with 2 micro-batches per step: 8 units are left, 4 steps, not the 10 of a fresh run
    second = tiny_run_args(run, tiny_corpus, *common, "train.world_batch_size=4")
    assert train_module.main(second) == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["accum"] for r in rows] == [4, 4, 4, 2, 2, 2, 2]
    assert rows[-1]["tokens"] == budget and rows[-1]["step"] == 7
    assert rows[-1]["lr"] == pytest.approx(3e-3 + (1e-4 - 3e-3) * 0.5)  # the cooldown of 2 ends at step 7


# -- 3. checkpoint re-save and retention ----------------------------------------------------------------


class SimulatedCrash(BaseException):
    """The process dies here (not an Exception, so nothing on the way cleans up)."""


def _save(root: Path, step: int, value: float, keep: int = 0) -> Path:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return save_checkpoint(
        root,
        step,
        model=model,
        model_config={"name": "linear"},
        settings_yaml="run: {}\n",
        state={"progress": {"step": step, "value": value}},
        rank_state={"rng": rng_state()},
        keep=keep,
    )


def _value(folder: Path) -> float:
    return load_state(folder)["progress"]["value"]


def test_resave_crash_while_deleting_the_old_folder_keeps_latest_valid(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 4, 1.0)
    real_rmtree = ckpt_mod.shutil.rmtree

    def crashing_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".tmp-"):
            return real_rmtree(path, *args, **kwargs)
        (path / "model.safetensors").unlink()  # part of the folder is gone, then the process dies
        raise SimulatedCrash

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", crashing_rmtree)
    with pytest.raises(SimulatedCrash):
        _save(root, 4, 2.0)
    monkeypatch.undo()
    found = find_latest(root)
    assert found == root / "step-00000004" and (root / LATEST).read_text().strip() == found.name
    verify_checkpoint(found)
    assert _value(found) == 2.0
    _save(root, 8, 3.0, keep=1)  # the next save clears what the crash left
    assert not list(root.glob(".old-*"))


def test_resave_failing_to_rename_the_new_folder_keeps_the_old_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 4, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp-step"):
            raise OSError("disk gone")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    with pytest.raises(Exception, match="disk gone"):  # OSError, or the driver's CheckpointSaveError
        _save(root, 4, 2.0)
    monkeypatch.undo()
    found = find_latest(root)
    assert found == root / "step-00000004" and _value(found) == 1.0


def test_resave_killed_between_its_two_renames_falls_back_to_the_old_folder(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4, 1.0)
    final = root / "step-00000004"
    os.replace(final, root / ".old-step-00000004")  # the first rename happened, the second did not
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        found = find_latest(root)
    assert found is not None and _value(found) == 1.0


def test_prune_follows_save_order_after_resuming_from_an_older_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        _save(root, step, float(step), keep=3)
    # run.resume=<step-4>: the run goes on from 4 and saves 6 and 7; 8 and 12 are stale
    _save(root, 6, 6.0, keep=2)
    _save(root, 7, 7.0, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000006", "step-00000007"]
    assert find_latest(root) == root / "step-00000007"


def test_prune_never_deletes_latest_and_orders_old_manifests_by_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        _save(root, step, float(step))
    for folder in list_checkpoints(root):  # checkpoints written before the save counter existed
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest.pop("serial", None)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    _save(root, 5, 5.0)  # a newer save, with a counter, of a lower step
    (root / LATEST).write_text("step-00000010\n")
    removed = prune_checkpoints(root, keep=1)
    assert [p.name for p in removed] == ["step-00000020"]
    assert [p.name for p in list_checkpoints(root)] == ["step-00000005", "step-00000010"]
