"""checkpoint.async: the loop trains on while a background thread writes the checkpoint, what it writes is the
state of the save's step, one save at a time, and the run ends only once its last save is complete.

Real in-process runs of train.py on the tiny corpus; the safetensors writer is wrapped to make the background
write slow or to hold it until the loop has trained further. The kill during an asynchronous save is in
tests/test_fault_kill.py, the chain across strategies and world sizes in tests/test_sharded_checkpoint.py, a full
disk during one in tests/test_fault_checkpoint.py.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, tiny_run_args

from recpre.async_checkpoint import AsyncSaver, wait_for_saves
from recpre.checkpoint import find_latest, load_state, verify_checkpoint
from recpre.errors import UserError
from recpre.monitor import read_metrics
from recpre.settings import load_settings, settings_to_yaml

HERE = Path(__file__).resolve()
EXTRA = ["train.max_steps=8", "checkpoint.interval=4", "checkpoint.keep=10", "eval.interval=0"]


def args_for(run: Path, corpus, *extra: str) -> list[str]:
    return tiny_run_args(run, corpus, *EXTRA, *extra)


def loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def assert_same_state(got: object, ref: object, where: str = "state") -> None:
    if torch.is_tensor(ref):
        assert torch.equal(got, ref), where
    elif isinstance(ref, dict):
        assert got.keys() == ref.keys(), where
        for key in ref:
            assert_same_state(got[key], ref[key], f"{where}/{key}")
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), where
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert got == ref, where


@pytest.fixture(scope="module")
def synchronous(train_module, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("sync") / "run"
    assert train_module.main(args_for(run, tiny_corpus)) == 0
    return run


def test_training_goes_on_while_a_save_is_written_and_the_save_holds_its_steps_state(
    train_module, tiny_corpus, synchronous, tmp_path, monkeypatch
):
    """The writer of step 4 is held (in its background thread) until the loop has logged step 6: a synchronous
    save would never get there. What it then writes is the state of step 4, bit for bit the synchronous run's
    (weights, optimizer moments, counters, loader and RNG), not the weights of the steps trained meanwhile."""
    run = tmp_path / "run"
    real_save_file = safetensors.torch.save_file
    held = {}

    def held_save_file(tensors, filename, *args, **kwargs):
        if ".tmp-step-00000004" in str(filename):
            held["thread"] = threading.current_thread()
            deadline = time.monotonic() + 30
            while max(loss_steps(run), default=0) < 6:
                assert time.monotonic() < deadline, "the loop did not train on while step 4 was being written"
                time.sleep(0.01)
            held["trained_on"] = max(loss_steps(run))
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", held_save_file)
    assert train_module.main(args_for(run, tiny_corpus, "checkpoint.async=true")) == 0
    assert held["thread"] is not threading.main_thread() and held["trained_on"] >= 6

    ckpt, ref = run / "checkpoints" / "step-00000004", synchronous / "checkpoints" / "step-00000004"
    verify_checkpoint(ckpt)
    assert_same_state(weights(ckpt), weights(ref), "weights")
    assert_same_state(load_state(ckpt), load_state(ref))
    rows = read_metrics(run / "metrics.jsonl")
    assert {r["step"]: r["loss"] for r in rows if "loss" in r} == {
        r["step"]: r["loss"] for r in read_metrics(synchronous / "metrics.jsonl") if "loss" in r
    }
    assert_same_state(
        weights(run / "checkpoints" / "step-00000008"), weights(synchronous / "checkpoints" / "step-00000008")
    )


def test_one_save_at_a_time_and_the_run_ends_after_its_last_save(train_module, tiny_corpus, tmp_path, monkeypatch):
    """A save every step, each write slower than a step: a save waits for the one in flight (never two writers at
    once), and main() returns only when the final checkpoint is complete and recorded before `finished`."""
    run = tmp_path / "run"
    real_save_file = safetensors.torch.save_file
    writing, most, written = [0], [0], []
    lock = threading.Lock()

    def slow_save_file(tensors, filename, *args, **kwargs):
        with lock:
            writing[0] += 1
            most[0] = max(most[0], writing[0])
        time.sleep(0.3)
        real_save_file(tensors, filename, *args, **kwargs)
        with lock:
            writing[0] -= 1
            written.append(Path(filename).parent.name)

    monkeypatch.setattr(safetensors.torch, "save_file", slow_save_file)
    assert train_module.main(args_for(run, tiny_corpus, "checkpoint.async=true", "checkpoint.interval=1")) == 0
    assert most[0] == 1, "two checkpoint writes were in flight at once"
    assert written == [f".tmp-step-{s:08d}" for s in range(1, 9)]
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000008" and find_latest(root).name == "step-00000008"
    verify_checkpoint(root / "step-00000008")
    events = [(r.get("event"), r.get("step")) for r in read_metrics(run / "metrics.jsonl") if r.get("event")]
    assert [s for e, s in events if e == "checkpoint"] == list(range(1, 9))
    assert events[-1][0] == "finished" and events[-2] == ("checkpoint", 8), events


def test_a_signal_stop_waits_for_its_async_save_before_exit(tiny_corpus, tmp_path):
    """SIGTERM to a real train.py whose checkpoint writes take 1 s each: the stop's save (written in the
    background) is complete, verified and `latest`, and recorded before the `stopped` event, when the process
    exits. The time-limit stop ends through the same path (finish)."""
    run = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    args = args_for(run, tiny_corpus, "train.max_steps=40", "checkpoint.interval=0", "checkpoint.async=true")
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "1.0", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(loss_steps(run)) < 3 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    events = [(r.get("event"), r.get("step")) for r in read_metrics(run / "metrics.jsonl") if r.get("event")]
    at = max(loss_steps(run))
    assert at < 40 and events[-2:] == [("checkpoint", at), ("stopped", at)], events
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step-{at:08d}" and find_latest(root).name == f"step-{at:08d}"


def test_a_save_in_flight_is_completed_before_the_process_group_closes(tmp_path):
    """A run that ends on an error (train.py's finally) lets the save in flight finish: wait_for_saves blocks
    until the background write is done, and reports a failed one as a warning instead of raising."""
    saver, done = AsyncSaver(None), tmp_path / "done"

    def slow_write(group):
        time.sleep(0.3)
        done.write_text("written")
        return tmp_path

    saver.submit(1, tmp_path, slow_write, None)
    with pytest.raises(RuntimeError, match="still in flight"):
        saver.submit(2, tmp_path, slow_write, None)
    wait_for_saves()
    assert done.read_text() == "written" and not saver.in_flight


def test_checkpoint_async_is_a_settings_key_that_round_trips(tmp_path):
    settings = load_settings(None, ["checkpoint.async=true"])
    assert settings.checkpoint.async_ is True
    text = settings_to_yaml(settings)
    assert "  async: true\n" in text and "async_" not in text
    (tmp_path / "s.yaml").write_text(text)
    assert load_settings(tmp_path / "s.yaml", []).checkpoint.async_ is True
    with pytest.raises(UserError, match=r"checkpoint\.async in command-line override .* must be true or false"):
        load_settings(None, ["checkpoint.async=sometimes"])
    with pytest.raises(UserError, match=r"unknown key 'checkpoint\.async_'.*did you mean 'checkpoint\.async'"):
        load_settings(None, ["checkpoint.async_=true"])


# ------------------------------------------------------------------------------------------------ child process

if __name__ == "__main__":  # python tests/test_async_checkpoint.py SECONDS train-args...: every weights write slowed
    delay, real = float(sys.argv[1]), safetensors.torch.save_file

    def slow_save_file(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    safetensors.torch.save_file = slow_save_file
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
