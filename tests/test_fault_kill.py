"""kill -9 of real train.py processes, at random points and inside a checkpoint write: nothing is lost.

Each killed run is a real `python train.py` subprocess. To land the kill inside a checkpoint write, this file
also runs as a script (`python tests/test_fault_kill.py PHASE STEP train-args...`): it wraps one step of the
checkpoint writer so that it prints PAUSED and sleeps at that phase, then executes train.py as __main__; the test
sends SIGKILL when it reads PAUSED. The resumed run (in-process, one thread, like the killed one) must reproduce
the uninterrupted run's loss rows and final weights bit for bit (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre.checkpoint import find_latest, list_checkpoints, verify_checkpoint
from recpre.monitor import read_metrics

HERE = Path(__file__).resolve()
STEPS = 12
EXTRA = [f"train.max_steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep=2"]


def args_for(run: Path, corpus) -> list[str]:
    return tiny_run_args(run, corpus, *EXTRA)


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def loss_rows(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def val_rows(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(train_module, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_module.main(args_for(run, tiny_corpus)) == 0
    assert list(loss_rows(run)) == list(range(1, STEPS + 1))
    return run


def resume_and_compare(train_module, corpus, run: Path, reference: Path, capsys, *extra: str) -> str:
    """Resume `run` in-process to the end; its losses, validation and final weights must equal the reference's."""
    capsys.readouterr()
    assert train_module.main(args_for(run, corpus) + ["log.progress=lines", *extra]) == 0
    out = capsys.readouterr().out
    assert loss_rows(run) == loss_rows(reference)
    assert val_rows(run) == val_rows(reference)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), "a resumed run must not leave duplicate or missing rows"
    assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "finished"
    ref, got = final_weights(reference), final_weights(run)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    root = run / "checkpoints"
    assert not list(root.glob(".tmp-*")), "stale temp folders must be cleaned up by the next save"
    assert (root / "latest").read_text().strip() == f"step-{STEPS:08d}"
    return out


def complete_checkpoints(run: Path) -> list[str]:
    """Names of checkpoint folders that verify; asserts that every listed folder verifies."""
    root = run / "checkpoints"
    names = []
    for folder in list_checkpoints(root):
        verify_checkpoint(folder)
        names.append(folder.name)
    return names


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_a_random_point_then_resume_equals_an_uninterrupted_run(
    seed, train_module, tiny_corpus, reference, tmp_path, capsys
):
    rng = random.Random(seed)
    target, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.15)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args_for(run, tiny_corpus)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(step >= target for step in loss_rows(run)):
                break
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (step {target}): {err[-2000:]}"

    complete = complete_checkpoints(run)
    latest = find_latest(run / "checkpoints")
    assert (latest is None) == (not complete)
    if latest is not None:
        assert latest.name in complete and not latest.name.startswith(".")
    out = resume_and_compare(train_module, tiny_corpus, run, reference, capsys)
    if latest is not None:
        assert f"resumed from {latest.name}" in out


# Where inside the save of step 6 the writer pauses (and is killed); what a resume must then use.
PHASES = {
    # model.safetensors written into .tmp-step-00000006, state.pt not yet: a torn temp folder
    "files": "step-00000004",
    # a torn file: half of model.safetensors in the temp folder
    "torn-file": "step-00000004",
    # every file and the manifest written, the temp folder not yet renamed
    "manifest": "step-00000004",
    # renamed to step-00000006, `latest` still names step-00000004 (both complete)
    "latest": "step-00000004",
    # `latest` replaced, older checkpoints not yet pruned
    "prune": "step-00000006",
}


@contextlib.contextmanager
def paused_run(phase: str, run: Path, corpus, *extra: str):
    """A child training run paused inside the write of checkpoint 6 at `phase` (it prints PAUSED); SIGKILL when
    the block ends."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), phase, "6", *args_for(run, corpus), *extra],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in proc.stdout:  # anything else the run prints comes first
            seen.append(line)
            if line.startswith("PAUSED"):
                break
        assert seen and seen[-1].startswith("PAUSED"), "".join(seen) + proc.stderr.read()[-3000:]
        yield proc
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_inside_a_checkpoint_write_never_yields_a_partial_latest(
    phase, train_module, tiny_corpus, reference, tmp_path, capsys
):
    run = tmp_path / "run"
    with paused_run(phase, run, tiny_corpus) as proc:
        pass  # killed as it stands, inside the write
    assert proc.returncode == -signal.SIGKILL

    root = run / "checkpoints"
    tmp = root / ".tmp-step-00000006"
    if phase in ("files", "torn-file", "manifest"):
        assert tmp.is_dir(), "the kill must land inside the write of step 6"
        assert complete_checkpoints(run) == ["step-00000002", "step-00000004"]
    else:
        assert (root / "step-00000006").is_dir() and not tmp.exists()
    if phase == "manifest":
        assert (tmp / "manifest.json").is_file()  # complete, but a temp folder is never a checkpoint
    if phase == "latest":
        assert (root / "latest").read_text().strip() == "step-00000004"
    expected = PHASES[phase]
    assert find_latest(root).name == expected
    out = resume_and_compare(train_module, tiny_corpus, run, reference, capsys)
    assert f"resumed from {expected}" in out


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_as_latest(
    train_module, tiny_corpus, reference, tmp_path, capsys
):
    """checkpoint.async: the background writer of step 6 pauses after model.safetensors while the loop trains on
    (step 7 is logged); SIGKILL then leaves step 4 as `latest`, and the run resumes from it to the same end."""
    run = tmp_path / "run"
    asynchronous = ["checkpoint.async=true"]
    with paused_run("files", run, tiny_corpus, *asynchronous) as proc:
        deadline = time.monotonic() + 60
        while max(loss_rows(run), default=0) < 7 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        trained_on = max(loss_rows(run), default=0)
    assert proc.returncode == -signal.SIGKILL
    assert trained_on >= 7, "training must go on while the checkpoint of step 6 is written"

    root = run / "checkpoints"
    assert (root / ".tmp-step-00000006").is_dir(), "the kill must land inside the write of step 6"
    assert complete_checkpoints(run) == ["step-00000002", "step-00000004"]
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert find_latest(root).name == "step-00000004"
    out = resume_and_compare(train_module, tiny_corpus, run, reference, capsys, *asynchronous)
    assert "resumed from step-00000004" in out


# ------------------------------------------------------------------------------------------------ child process


def _pause(phase: str) -> None:
    print(f"PAUSED {phase}", flush=True)
    time.sleep(600)


def _install(phase: str, at_step: int) -> None:
    """Wrap one piece of the checkpoint writer so that the save of `at_step` stops at `phase`."""
    import safetensors.torch

    import recpre.checkpoint as ck
    import recpre.train_state as ts

    current = {"step": -1}
    original_save = ck.save_checkpoint

    def save_checkpoint(root, step, **kw):
        current["step"] = step
        return original_save(root, step, **kw)

    ck.save_checkpoint = save_checkpoint
    ts.save_checkpoint = save_checkpoint  # the run's state registry calls the writer by this name
    hit = lambda: current["step"] == at_step  # noqa: E731

    if phase in ("files", "torn-file"):

        def pausing(original):  # the weights are written from a module or from a gathered state dict
            def write(weights, filename, *a, **kw):
                original(weights, filename, *a, **kw)
                if hit():
                    if phase == "torn-file":
                        data = Path(filename).read_bytes()
                        Path(filename).write_bytes(data[: len(data) // 2])
                    _pause(phase)

            return write

        safetensors.torch.save_model = pausing(safetensors.torch.save_model)
        safetensors.torch.save_file = pausing(safetensors.torch.save_file)
    elif phase == "manifest":
        original_manifest = ck._write_manifest

        def write_manifest(*args, **kwargs):
            original_manifest(*args, **kwargs)
            if hit():
                _pause(phase)

        ck._write_manifest = write_manifest
    elif phase == "latest":
        original_text = ck._write_text_atomic

        def write_text_atomic(*args, **kwargs):
            if hit():
                _pause(phase)
            original_text(*args, **kwargs)

        ck._write_text_atomic = write_text_atomic
    elif phase == "prune":
        original_prune = ck.prune_checkpoints

        def prune(*args, **kwargs):
            if hit():
                _pause(phase)
            return original_prune(*args, **kwargs)

        ck.prune_checkpoints = prune
    else:
        raise SystemExit(f"unknown phase {phase}")


if __name__ == "__main__":
    _install(sys.argv[1], int(sys.argv[2]))
    sys.argv = [str(REPO / "train.py"), *sys.argv[3:]]
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
