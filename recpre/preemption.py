"""Stopping a run cleanly before its batch job ends, and asking SLURM to run it again.

A batch job can end under a run in three ways: its time limit, a warning signal (SIGUSR2, sent by
`#SBATCH --signal=USR2@N` that `launchers/submit.py` writes, or by hand: `scancel --signal=USR2 JOB`;
SIGUSR1, which many existing batch scripts ask for, is treated the same),
or a termination (SIGTERM: `scancel`, preemption, node drain). Signal handlers here only set a flag;
the driver looks at it at each step boundary (`StopRequest.should_save_and_exit`), saves a
checkpoint, and exits. Saving inside a handler could tear a half-written step.

Requeue policy (decided here, documented in docs/launching.md): after the save, rank 0 calls
`StopRequest.requeue()`, which runs `scontrol requeue $SLURM_JOB_ID` when the stop was for time
(the end-time deadline, SIGUSR2 or SIGUSR1) and the job runs under SLURM. Ranks can stop for different
reasons (only rank 0 re-reads the end time; a signal reaches one node first), so the driver MAX-reduces
`stop_code(reason)` over ranks and hands the result to `StopRequest.agree` before rank 0 decides.
The requeued job starts the same batch script again and `run.resume: auto` continues from the
checkpoint. A SIGTERM stop saves but does not requeue: a user's `scancel` means stop, and SLURM
requeues preempted jobs itself. We do not rely on submitit's `Checkpointable`: its handler requeues
from inside the signal, before the trainer has finished its step and its save, and it cannot see
torchrun's worker processes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

# Reasons a stop can have; `requeue()` only acts on the time ones (all but SIGTERM).
REASON_TIME = "time-limit"
REASON_USR2 = "SIGUSR2"
REASON_USR1 = "SIGUSR1"
REASON_TERM = "SIGTERM"
REQUEUE_REASONS = frozenset({REASON_TIME, REASON_USR2, REASON_USR1})
# Codes for the MAX reduction over ranks: a time stop outranks SIGTERM, so one rank that saw the deadline
# makes the job requeue even when another rank (rank 0 included) only saw SIGTERM or nothing.
STOP_CODES: dict[str | None, int] = {None: 0, REASON_TERM: 1, REASON_USR1: 2, REASON_USR2: 3, REASON_TIME: 4}
_REASONS_BY_CODE = {code: reason for reason, code in STOP_CODES.items()}


def stop_code(reason: str | None) -> int:
    """The code of a stop reason for the MAX reduction over ranks (an unknown reason counts as SIGTERM)."""
    return STOP_CODES.get(reason, STOP_CODES[REASON_TERM])


def reason_from_code(code: int) -> str | None:
    """The stop reason of a MAX-reduced code (None: no rank had a reason)."""
    return _REASONS_BY_CODE.get(int(code), REASON_TERM)


def agreed_reason(reasons: Iterable[str | None]) -> str | None:
    """The reason all ranks stop for, given each rank's own: what the MAX reduction of `stop_code` gives."""
    return reason_from_code(max((stop_code(r) for r in reasons), default=0))


_SCONTROL_TIMEOUT_S = 20
# How often rank 0 re-asks SLURM for the end time (a time limit can be changed while the job runs).
REFRESH_ENV = "RECPRE_END_TIME_REFRESH_S"
DEFAULT_REFRESH_S = 300.0


def _parse_slurm_time(text: str) -> float | None:
    """SLURM prints end times in the controller's local time without a zone ("2026-11-23T10:00:00")."""
    text = text.strip()
    if not text or text in {"Unknown", "None", "N/A", "NONE"}:
        return None
    if text.isdigit():
        return float(text)
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def _run(argv: list[str], runner: Callable[..., subprocess.CompletedProcess] | None = None) -> str | None:
    if shutil.which(argv[0]) is None and runner is None:
        return None
    run = runner or subprocess.run
    try:
        proc = run(argv, capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_job_end_time(
    env: Mapping[str, str] | None = None, runner: Callable[..., subprocess.CompletedProcess] | None = None
) -> float | None:
    """Unix time at which SLURM will end this job, or None outside SLURM / without a time limit.

    On rank 0 `scontrol show job` is asked first because it follows time-limit changes made after the
    start (`scontrol update JobId=.. TimeLimit=..`); SLURM_JOB_END_TIME (set at job start by newer SLURM
    versions; 22.05 leaves it empty) and `squeue -o %e` are the fallbacks.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    rank = env.get("RANK") or env.get("SLURM_PROCID") or "0"  # torchrun's global rank first: PROCID is per node
    if rank != "0":
        # Thousands of ranks asking slurmctld at once would stall it; rank 0's deadline stops all
        # ranks (the driver MAX-reduces the flag), the others only read the environment.
        end = _parse_slurm_time(env.get("SLURM_JOB_END_TIME", ""))
        return end if end is not None and end > 0 else None
    out = _run(["scontrol", "show", "job", "-o", job_id], runner)
    if out:
        for token in out.split():
            if token.startswith("EndTime="):
                end = _parse_slurm_time(token.split("=", 1)[1])
                if end is not None:
                    return end
    end = _parse_slurm_time(env.get("SLURM_JOB_END_TIME", ""))
    if end is not None and end > 0:
        return end
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%e"], runner)
    if out:
        return _parse_slurm_time(out.splitlines()[0] if out.splitlines() else "")
    return None


@dataclass
class StopRequest:
    """A flag the driver checks at step boundaries: save a checkpoint and exit when it says so.

    `end_time` (unix seconds) and `save_before_end_s` set the deadline `end_time - save_before_end_s`;
    signal handlers set `requested`. `reason` says why (REASON_TIME, REASON_USR2, REASON_TERM).
    """

    end_time: float | None = None
    save_before_end_s: float = 0.0
    requested: bool = False
    reason: str | None = None
    job_id: str | None = None
    # Re-read the end time this often (seconds; 0 = never): `scontrol update TimeLimit=` moves it.
    refresh_s: float = 0.0
    _read_end: Callable[[], float | None] | None = field(default=None, repr=False)
    _last_read: float = field(default=0.0, repr=False)
    _previous: dict[int, object] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(
        cls,
        save_before_end_min: float,
        *,
        on_signal: bool = True,
        env: Mapping[str, str] | None = None,
        runner: Callable[..., subprocess.CompletedProcess] | None = None,
    ) -> StopRequest:
        """Read the job's end time (SLURM only) and, when `on_signal`, install SIGUSR1/SIGUSR2/SIGTERM handlers.

        `save_before_end_min` <= 0 turns the deadline off (signals still work).
        """
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID") or None
        end = slurm_job_end_time(env, runner) if save_before_end_min > 0 else None
        refresh = float(env.get(REFRESH_ENV, DEFAULT_REFRESH_S)) if job_id and save_before_end_min > 0 else 0.0
        stop = cls(
            end_time=end,
            save_before_end_s=max(save_before_end_min, 0.0) * 60.0,
            job_id=job_id,
            refresh_s=refresh,
            _read_end=lambda: slurm_job_end_time(env, runner),
            _last_read=time.time(),
        )
        if on_signal:
            stop.install()
        return stop

    @property
    def deadline(self) -> float | None:
        """Unix time after which the run should save and exit, or None."""
        return None if self.end_time is None else self.end_time - self.save_before_end_s

    def request(self, reason: str) -> None:
        """Ask for a stop; the first reason wins (a SIGTERM during a time stop keeps the time reason)."""
        if not self.requested:
            self.reason = reason
        self.requested = True

    def should_save_and_exit(self, now: float | None = None) -> bool:
        """True once a signal arrived or the deadline passed; cheap enough to call every step."""
        if self.requested:
            return True
        now = time.time() if now is None else now
        if self.refresh_s > 0 and self._read_end is not None and now - self._last_read >= self.refresh_s:
            self._last_read = now
            end = self._read_end()
            if end is not None:
                self.end_time = end
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self.request(REASON_TIME)
        return self.requested

    def agree(self, code: int) -> str | None:
        """Adopt the MAX-reduced `stop_code` of all ranks, so rank 0 requeues when any rank stopped for time."""
        reason = reason_from_code(code)
        if reason is not None:
            self.reason = reason
            self.requested = True
        return self.reason

    def _handle(self, signum: int, frame: object) -> None:
        names = {signal.SIGUSR2: REASON_USR2, signal.SIGUSR1: REASON_USR1}
        self.request(names.get(signum, REASON_TERM))

    def install(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)) -> bool:
        """Install the flag-setting handlers; returns False off the main thread, where Python forbids it."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install` (tests, and drivers run in-process)."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def wants_requeue(self) -> bool:
        """A stop for time under SLURM: the run is not finished and its job should run again."""
        return self.requested and self.reason in REQUEUE_REASONS and bool(self.job_id)

    def requeue(self, runner: Callable[..., subprocess.CompletedProcess] | None = None) -> bool:
        """After the checkpoint is saved (rank 0 only): `scontrol requeue` this job when the stop was for time.

        Call it last: SLURM ends the current job step right away. Returns whether the requeue was accepted.
        """
        if not self.wants_requeue:
            return False
        run = runner or subprocess.run
        try:
            proc = run(
                ["scontrol", "requeue", str(self.job_id)],
                capture_output=True,
                text=True,
                timeout=_SCONTROL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            print(f"warning: could not requeue SLURM job {self.job_id}: {err}", file=sys.stderr, flush=True)
            return False
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout or "").strip()
            print(f"warning: scontrol requeue {self.job_id} failed: {msg}", file=sys.stderr, flush=True)
            return False
        return True
