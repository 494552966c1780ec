"""Checkpoints damaged on disk, and a disk that fills up during a save: detected, reported, nothing lost.

A finished 8-step run (checkpoints at steps 4, 6, 8) is copied per test; its newest checkpoint is damaged by
real file edits (truncation, flipped bytes, a broken manifest). Running the same command again must warn
naming the bad folder, resume from step 6, and end with the very weights and losses of the undamaged run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args

from recpre.checkpoint import find_latest, list_checkpoints, load_model, load_state, verify_checkpoint
from recpre.errors import run_cli
from recpre.monitor import read_metrics

EXTRA = ["train.max_steps=8", "checkpoint.interval=2", "checkpoint.keep=3", "eval.interval=0"]


def args_for(run: Path, corpus, *extra: str) -> list[str]:
    return tiny_run_args(run, corpus, *EXTRA, *extra)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(train_module, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train_module.main(args_for(run, tiny_corpus)) == 0
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-00000004", "step-00000006", "step-00000008"]
    return run


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "model-truncated": (lambda f: truncate(f / "model.safetensors"), "bytes, the manifest says"),
    "model-flipped-byte": (lambda f: flip_byte(f / "model.safetensors"), "sha256"),
    "state-flipped-byte": (lambda f: flip_byte(f / "state.pt", 0.9), "sha256"),
    "state-emptied": (lambda f: truncate(f / "state.pt", 0.0), "bytes, the manifest says"),
    "config-missing": (lambda f: (f / "model_config.json").unlink(), "missing"),
    "manifest-torn": (lambda f: truncate(f / "manifest.json", 0.6), "not a valid manifest"),
    "manifest-missing": (lambda f: (f / "manifest.json").unlink(), "has no manifest.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_detected_and_the_run_falls_back_to_the_previous_one(
    damage, train_module, tiny_corpus, finished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    bad = run / "checkpoints" / "step-00000008"
    apply, reason = DAMAGE[damage]
    apply(bad)

    with pytest.raises(Exception, match=reason):
        verify_checkpoint(bad)
    with pytest.warns(UserWarning, match=r"skipping bad checkpoint .*step-00000008.*" + reason):
        assert find_latest(run / "checkpoints").name == "step-00000006"
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_module.main(args_for(run, tiny_corpus, "log.progress=lines")) == 0
    assert "resumed from step-00000006" in capsys.readouterr().out
    # the warning names the bad folder and what is wrong with it
    messages = [str(w.message) for w in caught if "skipping bad checkpoint" in str(w.message)]
    assert messages and "step-00000008" in messages[0] and reason in messages[0], messages

    # the damaged folder is replaced by a good step 8 equal to the undamaged run's
    verify_checkpoint(bad)
    assert losses(run) == losses(finished)
    ref, got = weights(finished / "checkpoints" / "step-00000008"), weights(bad)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def cli(train_module, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python train.py ARGV`, in-process through the real command-line wrapper."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_module.main(argv))
    return exited.value.code, capsys.readouterr().err


def refusal(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


EVERY_CHECKPOINT = {
    "flipped-bytes": lambda f: flip_byte(f / "model.safetensors"),
    "manifest-deleted": lambda f: (f / "manifest.json").unlink(),
    "manifest-torn": lambda f: truncate(f / "manifest.json", 0.6),
}


@pytest.mark.parametrize("damage", list(EVERY_CHECKPOINT))
def test_when_no_checkpoint_verifies_the_run_refuses_to_start_over(
    damage, train_module, tiny_corpus, finished, tmp_path, capsys
):
    """Silently training from scratch would overwrite metrics.jsonl and later prune the damaged checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for folder in list_checkpoints(run / "checkpoints"):
        EVERY_CHECKPOINT[damage](folder)
    before = snapshot(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, err = cli(train_module, args_for(run, tiny_corpus), capsys)
    assert code == 2
    line = refusal(err)
    assert "none of the checkpoints in it verifies" in line, line
    assert "3 checkpoint folders" in line and "step-00000004 .. step-00000008" in line, line
    assert "run.out_dir" in line and "run.resume=never" in line, line
    if damage == "manifest-deleted":
        assert "3 of them without manifest.json" in line, line
    assert snapshot(run) == before


def test_a_run_whose_checkpoints_are_gone_refuses_to_start_over(train_module, tiny_corpus, finished, tmp_path, capsys):
    """metrics.jsonl records saved checkpoints, the checkpoints/ folder was moved away: not a fresh run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    code, err = cli(train_module, args_for(run, tiny_corpus), capsys)
    assert code == 2
    line = refusal(err)
    assert "checkpoints saved at steps 2, 4, 6, 8" in line and "are gone" in line, line
    assert snapshot(run) == before


def test_resume_never_refuses_a_folder_with_checkpoints_even_without_manifests(
    train_module, tiny_corpus, finished, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for folder in list_checkpoints(run / "checkpoints"):
        (folder / "manifest.json").unlink()
    before = snapshot(run)
    code, err = cli(train_module, args_for(run, tiny_corpus, "run.resume=never"), capsys)
    assert code == 2
    line = refusal(err)
    assert "run.resume=never" in line and "run.resume=auto" in line and "3 checkpoint folders" in line, line
    assert snapshot(run) == before


def test_an_attempt_that_died_before_its_first_checkpoint_starts_over_with_a_warning(
    train_module, tiny_corpus, finished, tmp_path
):
    """Nothing of it can be resumed: its training rows are replaced, and the run says so."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [r for r in read_metrics(finished / "metrics.jsonl") if r.get("step", 0) <= 1 and "event" not in r]
    assert rows
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="records 1 training steps of an attempt that ended before its first"):
        assert train_module.main(args_for(run, tiny_corpus)) == 0
    assert losses(run) == losses(finished)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_during_a_save_is_reported_and_the_previous_checkpoint_stays_good(
    mode, train_module, tiny_corpus, finished, tmp_path, monkeypatch, capsys
):
    """The save of step 6 gets ENOSPC half-way through writing state.pt (after model.safetensors was written).

    With checkpoint.async the background writer fails while training goes on; the next save (step 8) waits for
    it, and the run stops there with the same one-line error and exit code as a synchronous save's failure."""
    run = tmp_path / "run"
    real_save = torch.save
    asynchronous = ["checkpoint.async=true"] if mode == "async" else []

    def full_disk_save(obj, f, *args, **kwargs):
        if "step-00000006" in str(f):
            Path(f).write_bytes(b"\0" * 1000)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    capsys.readouterr()
    code = train_module.main(args_for(run, tiny_corpus, *asynchronous))
    err = capsys.readouterr().err
    assert code == 1
    assert "No space left on device" in err and "step-00000006" in err, err
    assert err.strip().splitlines()[-1].startswith("error: "), err

    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    assert find_latest(root).name == "step-00000004" and (root / "latest").read_text().strip() == "step-00000004"
    assert not list(root.glob(".tmp-*")), "the partial save must be removed (it only takes space on a full disk)"
    verify_checkpoint(root / "step-00000004")
    model, _ = load_model(root / "step-00000004")
    assert load_state(root / "step-00000004")["progress"]["step"] == 4
    assert sum(p.numel() for p in model.parameters()) > 0
    rows = read_metrics(run / "metrics.jsonl")
    assert not [r for r in rows if r.get("event") == "finished"]
    assert [r["step"] for r in rows if r.get("event") == "checkpoint"] == [2, 4], "step 6 is never recorded saved"
    if asynchronous:  # the loop went on while step 6 was written and stopped at the next save, step 8
        assert max(losses(run)) == 8

    # space freed: the same command resumes from step 4 and ends exactly like a run that never failed
    monkeypatch.setattr(torch, "save", real_save)
    assert train_module.main(args_for(run, tiny_corpus, *asynchronous)) == 0
    assert losses(run) == losses(finished)
    ref, got = weights(finished / "checkpoints" / "step-00000008"), weights(root / "step-00000008")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------------------------ a real full filesystem


def _mount_tmpfs(path: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `path`, or a skip saying why this machine gives none (not root, no mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (the CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_filesystem():
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def disk_bytes(folder: Path) -> int:
    """What a folder occupies on a tmpfs: every file rounded up to whole 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.iterdir())


@pytest.mark.parametrize("full_in", ["model.safetensors", "state.pt"])
def test_a_really_full_filesystem_during_a_save_is_reported_and_the_previous_checkpoint_stays_good(
    full_in, train_module, tiny_corpus, finished, tmp_path, small_filesystem, capsys
):
    """checkpoints/ is a real tmpfs with room for two checkpoints and part of a third: the save of step 6 fills
    it while safetensors (SafetensorError) or torch.save (RuntimeError, no errno) writes."""
    one = disk_bytes(finished / "checkpoints" / "step-00000004")
    model = disk_bytes_of(finished / "checkpoints" / "step-00000004" / "model.safetensors")
    extra = model // 2 if full_in == "model.safetensors" else model + 64 * 1024
    run = tmp_path / "run"
    root = small_filesystem(run / "checkpoints", 2 * one + 4096 + extra)

    code, err = cli_exit(train_module, args_for(run, tiny_corpus), capsys)
    assert code == 1, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: could not write checkpoint step-00000006"), err
    assert "No space left on device" in line and full_in in line, line
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "no temp folder or file is left behind"
    assert (root / "latest").read_text().strip() == "step-00000004"
    verify_checkpoint(root / "step-00000004")
    assert load_state(root / "step-00000004")["progress"]["step"] == 4

    # space freed: the same command resumes from step 4 and ends exactly like a run that never failed
    subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
    assert train_module.main(args_for(run, tiny_corpus)) == 0
    assert losses(run) == losses(finished)
    ref, got = weights(finished / "checkpoints" / "step-00000008"), weights(root / "step-00000008")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def disk_bytes_of(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


def cli_exit(train_module, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of main() itself: a failed save is exit code 1 from main, not a UserError."""
    capsys.readouterr()
    code = train_module.main(argv)
    return code, capsys.readouterr().err
