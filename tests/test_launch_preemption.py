"""The training side of preemption: deadline from the SLURM end time, signal flags, the requeue call."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from recpre.preemption import (
    REASON_TERM,
    REASON_TIME,
    REASON_USR2,
    StopRequest,
    _parse_slurm_time,
    slurm_job_end_time,
)


class FakeRunner:
    """Stands in for subprocess.run: answers scontrol/squeue, records every call."""

    def __init__(self, outputs: dict[str, tuple[int, str]]):
        self.outputs = outputs
        self.calls: list[list[str]] = []

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        rc, out = self.outputs.get(argv[0] + " " + argv[1], (1, ""))
        return subprocess.CompletedProcess(argv, rc, stdout=out, stderr="boom" if rc else "")


def _local(ts: str) -> float:
    return time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%S"))


def test_parse_slurm_time() -> None:
    assert _parse_slurm_time("2026-11-23T10:00:00") == _local("2026-11-23T10:00:00")
    assert _parse_slurm_time("1790000000") == 1790000000.0
    for text in ("Unknown", "", "N/A", "garbage"):
        assert _parse_slurm_time(text) is None


def test_end_time_outside_slurm_is_none() -> None:
    runner = FakeRunner({})
    assert slurm_job_end_time({}, runner) is None
    assert runner.calls == []


def test_end_time_from_scontrol_first() -> None:
    line = "JobId=42 JobName=x JobState=RUNNING StartTime=2026-11-23T09:00:00 EndTime=2026-11-23T21:00:00 Foo=bar\n"
    runner = FakeRunner({"scontrol show": (0, line)})
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": "1"}
    assert slurm_job_end_time(env, runner) == _local("2026-11-23T21:00:00")
    assert runner.calls[0] == ["scontrol", "show", "job", "-o", "42"]


def test_end_time_falls_back_to_env_then_squeue() -> None:
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": "1790000000"}
    assert slurm_job_end_time(env, FakeRunner({})) == 1790000000.0
    runner = FakeRunner({"squeue -h": (0, "2026-11-23T21:00:00\n")})
    assert slurm_job_end_time({"SLURM_JOB_ID": "42"}, runner) == _local("2026-11-23T21:00:00")


def test_other_ranks_do_not_ask_the_controller() -> None:
    runner = FakeRunner({"scontrol show": (0, "EndTime=2026-11-23T21:00:00")})
    env = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "5", "SLURM_JOB_END_TIME": "1790000000"}
    assert slurm_job_end_time(env, runner) == 1790000000.0
    assert slurm_job_end_time({"SLURM_JOB_ID": "42", "RANK": "3"}, runner) is None
    assert runner.calls == []


def test_deadline_triggers_time_stop() -> None:
    stop = StopRequest(end_time=1000.0, save_before_end_s=120.0, job_id="42")
    assert stop.deadline == 880.0
    assert not stop.should_save_and_exit(now=879.9)
    assert not stop.requested
    assert stop.should_save_and_exit(now=880.0)
    assert (stop.requested, stop.reason) == (True, REASON_TIME)
    assert stop.wants_requeue


def test_from_environment_reads_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner({"scontrol show": (0, "EndTime=1790000000")})
    stop = StopRequest.from_environment(10, on_signal=False, env={"SLURM_JOB_ID": "7"}, runner=runner)
    assert stop.end_time == 1790000000.0 and stop.deadline == 1790000000.0 - 600
    off = StopRequest.from_environment(0, on_signal=False, env={"SLURM_JOB_ID": "7"}, runner=runner)
    assert off.deadline is None and len(runner.calls) == 1
    assert StopRequest.from_environment(10, on_signal=False, env={}).job_id is None


@pytest.mark.parametrize(("sig", "reason"), [(signal.SIGUSR2, REASON_USR2), (signal.SIGTERM, REASON_TERM)])
def test_signal_sets_flag_only(sig: int, reason: str) -> None:
    before = signal.getsignal(sig)
    stop = StopRequest.from_environment(0, on_signal=True, env={"SLURM_JOB_ID": "9"})
    try:
        os.kill(os.getpid(), sig)
        for _ in range(100):
            if stop.requested:
                break
            time.sleep(0.01)
        assert stop.should_save_and_exit() and stop.reason == reason
        assert stop.wants_requeue == (sig == signal.SIGUSR2)
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) == before


def test_first_reason_wins() -> None:
    stop = StopRequest(job_id="1")
    stop.request(REASON_USR2)
    stop.request(REASON_TERM)
    assert stop.reason == REASON_USR2


def test_requeue_calls_scontrol_only_for_time_stops() -> None:
    runner = FakeRunner({"scontrol requeue": (0, "")})
    stop = StopRequest(job_id="42")
    assert not stop.requeue(runner)  # nothing requested
    stop.request(REASON_TERM)
    assert not stop.requeue(runner)  # scancel / preemption: SLURM decides
    assert runner.calls == []
    stop = StopRequest(job_id="42")
    stop.request(REASON_USR2)
    assert stop.requeue(runner)
    assert runner.calls == [["scontrol", "requeue", "42"]]
    outside = StopRequest(job_id=None)
    outside.request(REASON_TIME)
    assert not outside.requeue(runner)


def test_requeue_failure_is_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    stop = StopRequest(job_id="42")
    stop.request(REASON_TIME)
    assert not stop.requeue(FakeRunner({}))
    assert "scontrol requeue 42 failed: boom" in capsys.readouterr().err


def test_end_time_is_re_read_when_the_limit_changes() -> None:
    """`scontrol update TimeLimit=` while the job runs: the deadline follows at the next refresh."""
    t0 = int(time.time())
    answers = iter([f"EndTime={t0 + 10_000}", f"EndTime={t0 + 100}"])

    def run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 0, stdout=next(answers), stderr="")

    env = {"SLURM_JOB_ID": "42", "RECPRE_END_TIME_REFRESH_S": "60"}
    stop = StopRequest.from_environment(1, on_signal=False, env=env, runner=run)
    assert stop.end_time == t0 + 10_000 and stop.refresh_s == 60.0
    start = stop._last_read
    assert not stop.should_save_and_exit(now=start + 30)  # too soon to ask again
    assert stop.should_save_and_exit(now=start + 61)  # asked: the job now ends at t0 + 100, deadline t0 + 40
    assert stop.end_time == t0 + 100 and stop.reason == REASON_TIME
