"""Through a real single-node SLURM: a run is stopped (USR2, then a time limit), saves, requeues itself,
resumes from its checkpoint and ends with the same steps and losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_args
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STEPS = 300
RUN_ARGS = (f"train.max_steps={STEPS}", "eval.interval=100")
STEPS_2 = 60
REFERENCE_DIR: list[Path] = []  # the reference run's folder, once the fixture has run
RUN_ARGS_2 = (f"train.max_steps={STEPS_2}", "eval.interval=100")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(rows: list[dict]) -> dict[int, float]:
    """Loss per step; a step logged twice (after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def cpu_profile(tmp_path: Path, signal_before_end_s: int = 30, *, torchrun: bool = False) -> Path:
    path = tmp_path / "cpu-test.yaml"
    profile = {
        "description": "the test's single-node SLURM, CPU ranks",
        "executor": "slurm",
        "launch": "torchrun-per-node" if torchrun else "task-per-device",
        "devices_per_node": 2 if torchrun else 1,
        "python": sys.executable,
        "signal_before_end_s": signal_before_end_s,
        "sbatch": {"partition": "debug", "cpus-per-task": 2 if torchrun else 1},
        "setup": [],
        "env": {"OMP_NUM_THREADS": 1},
    }
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> dict[int, float]:
    """The uninterrupted run, trained directly (no SLURM)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    argv = [sys.executable, "train.py", *tiny_run_args(run_dir, tiny_corpus, *RUN_ARGS)]
    # The same thread count as the jobs (profile env): another count sums in another order.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(run_dir)
    assert rows[-1].get("event") == "finished"
    REFERENCE_DIR.append(run_dir)
    return losses(rows)


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_corpus) -> dict[int, float]:
    """The uninterrupted run on 2 ranks (torchrun --standalone), for the torchrun-per-node job."""
    run_dir = tmp_path_factory.mktemp("reference2") / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    argv += tiny_run_args(run_dir, tiny_corpus, *RUN_ARGS_2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(run_dir)
    assert rows[-1].get("event") == "finished"
    return losses(rows)


def submit(cluster: SlurmCluster, profile: Path, run_dir: Path, corpus, time_limit: str, *extra: str, args=None) -> str:
    argv = [sys.executable, "launchers/submit.py", "--cluster", str(profile), "--time", time_limit]
    argv += tiny_run_args(run_dir, corpus, *(RUN_ARGS if args is None else args), *extra)
    proc = subprocess.run(argv, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def wait_finished(cluster: SlurmCluster, job: str, run_dir: Path, timeout: float = 420) -> None:
    """Wait for the job to complete.

    A requeued job waits ~25 s on BeginTime; we start it sooner, but not within the second of its requeue:
    slurmd rejects a launch credential as revoked when it is created in the same second as the revocation.
    """
    deadline = time.time() + timeout
    pending_since: float | None = None
    while time.time() < deadline:
        info = cluster.job_info(job)
        state = info.get("JobState")
        if state == "COMPLETED":
            return
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            logs = "\n".join(p.read_text()[-3000:] for p in (run_dir / "slurm").glob("*.out"))
            pytest.fail(f"job {job} ended {state}:\n{logs}")
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 3:
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
                pending_since = None
        else:
            pending_since = None
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-3000:] for p in (run_dir / "slurm").glob("*.out"))
    pytest.fail(f"job {job} not finished after {timeout}s ({cluster.job_info(job)}):\n{logs}")


def check_resumed_run(
    run_dir: Path, reference: dict[int, float], reason: str, job_log: str, steps: int = STEPS
) -> None:
    rows = read_rows(run_dir)
    stops = [r for r in rows if r.get("event") == "stopped"]
    assert stops and stops[0]["reason"] == reason, stops
    assert 0 < stops[0]["step"] < steps
    assert rows[-1].get("event") == "finished" and rows[-1]["steps"] == steps
    got = losses(rows)
    assert sorted(got) == sorted(reference)
    assert got == reference  # bitwise: same thread count, same data order, same depths after the resume
    assert "restart 1" in job_log  # the same job id ran again: requeued, not resubmitted


def interrupt_with_usr2(cluster: SlurmCluster, job: str, run_dir: Path, steps: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        done = losses(read_rows(run_dir))
        if done and max(done) >= 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job {job} trained nothing in 180 s: {cluster.job_info(job)}")
    assert max(done) < steps - 10, "the run was too fast to interrupt; raise its step count"
    # Without --batch, SLURM signals the job's steps (our srun tasks and their children), not the batch shell.
    cluster.run("scancel", "--signal=USR2", job)
    wait_finished(cluster, job, run_dir)


def test_usr2_saves_requeues_and_resumes(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    tiny_corpus,
    reference: dict[int, float],
) -> None:
    run_dir = tmp_path / "usr2 run"
    job = submit(slurm_cluster, cpu_profile(tmp_path), run_dir, tiny_corpus, "00:20:00")
    interrupt_with_usr2(slurm_cluster, job, run_dir, STEPS)
    log = "\n".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))
    check_resumed_run(run_dir, reference, "SIGUSR2", log)


def test_torchrun_per_node_usr2_resumes(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    tiny_corpus,
    reference_two_ranks: dict[int, float],
) -> None:
    """The trn1 launch style: torchrun ignores USR2, its 2 workers save, the job requeues and resumes."""
    run_dir = tmp_path / "torchrun run"
    profile = cpu_profile(tmp_path, torchrun=True)
    job = submit(slurm_cluster, profile, run_dir, tiny_corpus, "00:20:00", args=RUN_ARGS_2)
    interrupt_with_usr2(slurm_cluster, job, run_dir, STEPS_2)
    log = "\n".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))
    check_resumed_run(run_dir, reference_two_ranks, "SIGUSR2", log, steps=STEPS_2)


def test_time_limit_saves_requeues_and_resumes(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    tiny_corpus,
    reference: dict[int, float],
) -> None:
    """The time limit is cut while the job trains (`scontrol update TimeLimit=1`): the trainer re-reads its end
    time, finds the save-before-end deadline passed, saves and requeues; the limit is put back while the
    requeued job waits on BeginTime, and the next segment finishes the run."""
    run_dir = tmp_path / "time run"
    # No USR2 here: the trainer's own deadline must do it. Deadline = end - 1 min: with a 1-minute limit,
    # the job start, already past.
    profile = cpu_profile(tmp_path, signal_before_end_s=0)
    env = dict(slurm_cluster.env, RECPRE_END_TIME_REFRESH_S="0.5")
    cluster = SlurmCluster(root=slurm_cluster.root, conf=slurm_cluster.conf, env=env)
    job = submit(cluster, profile, run_dir, tiny_corpus, "00:10:00", "checkpoint.save_before_end_min=1")
    deadline = time.time() + 180
    while time.time() < deadline:
        done = losses(read_rows(run_dir))
        if done and max(done) >= 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job {job} trained nothing in 180 s: {cluster.job_info(job)}")
    assert max(done) < STEPS - 10, "the run was too fast to interrupt; raise STEPS"
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")
    while time.time() < deadline and not any(r.get("event") == "stopped" for r in read_rows(run_dir)):
        time.sleep(0.1)
    while time.time() < deadline and cluster.job_info(job).get("Restarts", "0") == "0":
        time.sleep(0.1)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    wait_finished(cluster, job, run_dir)
    log = "\n".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))
    check_resumed_run(run_dir, reference, "time-limit", log)


def test_eval_job_array(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    reference: dict[int, float],
) -> None:
    """`--eval CKPT CKPT`: one array task per checkpoint, each writes its results next to its checkpoint."""
    ckpts = sorted((REFERENCE_DIR[0] / "checkpoints").glob("step-*"))[-2:]
    assert len(ckpts) == 2
    argv = [sys.executable, "launchers/submit.py", "--cluster", str(cpu_profile(tmp_path)), "--time", "00:10:00"]
    argv += ["--eval-out", str(tmp_path / "eval logs"), "--eval", *map(str, ckpts), "--", "--limit", "4"]
    proc = subprocess.run(argv, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted evaluation job (\d+)", proc.stdout).group(1)
    deadline = time.time() + 300
    while time.time() < deadline:
        out = slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip()
        if not out:
            break
        time.sleep(1)
    logs = "\n".join(p.read_text() for p in (tmp_path / "eval logs").glob("*.out"))
    for ckpt in ckpts:
        result = REFERENCE_DIR[0] / "eval" / f"{ckpt.name}.json"
        assert result.is_file(), logs[-3000:]
        assert f"evaluating {ckpt}" in logs
