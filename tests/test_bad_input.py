"""Every mistake a user can make in the input: one sentence on stderr, exit code 2, nothing written.

Most cases run train.py's `main` in-process through `run_cli` (the very wrapper `python train.py` uses), so the
exit code and the stderr line are the real ones; a few run as real subprocesses to prove the command line end
to end. A fresh run folder must not appear; an existing one must stay byte-for-byte unchanged.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_args

from recpre.errors import run_cli

RESUMABLE = ["train.max_steps=4", "checkpoint.interval=2", "eval.interval=0"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(train_module, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python train.py ARGV`, in-process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_module.main(argv))
    return exited.value.code, capsys.readouterr().err


def assert_one_sentence(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def finished(train_module, tiny_corpus, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (the resume cases copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train_module.main(tiny_run_args(run, tiny_corpus, *RESUMABLE)) == 0
    return run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- a fresh run


def fresh_cases(tmp: Path, corpus) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (extra argv, substrings the error sentence must contain)."""
    train_file = Path(corpus.train[0])
    truncated = tmp / "truncated" / "part-00000.parquet"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 2])
    garbage = tmp / "garbage" / "part-00000.parquet"
    garbage.parent.mkdir()
    garbage.write_bytes(b"PAR1 this is not parquet at all " * 100)
    (tmp / "empty").mkdir()
    write(tmp / "texts" / "notes.txt", "not tokenized")
    return {
        "malformed-yaml": (
            ["--config", str(write(tmp / "bad.yaml", "train:\n  max_steps: [3\n"))],
            ("not valid YAML",),
        ),
        "duplicate-yaml-key": (
            ["--config", str(write(tmp / "dup.yaml", "train:\n  max_steps: 3\n  max_steps: 4\n"))],
            ("duplicate key",),
        ),
        "unknown-yaml-key": (
            ["--config", str(write(tmp / "unknown.yaml", "train:\n  max_stepz: 3\n"))],
            ("train.max_stepz", "train.max_steps"),
        ),
        "unknown-override": (["optim.lrr=1e-3"], ("optim.lrr", "optim.lr")),
        "unknown-section": (["trainer.max_steps=3"], ("trainer",)),
        "wrong-type-yaml": (["--config", str(write(tmp / "type.yaml", "optim:\n  lr: fast\n"))], ("optim.lr",)),
        "wrong-type-override": (["train.max_steps=ten"], ("train.max_steps",)),
        "missing-config": (["--config", str(tmp / "nowhere.yaml")], ("nowhere.yaml", "does not exist")),
        "vocab-mismatch": (["model.overrides.vocab_size=256"], ("vocab_size", "4096")),
        "no-parquet-folder": ([f"data.train=[{tmp / 'empty'}]"], ("holds no .parquet files",)),
        "text-only-folder": ([f"data.train=[{tmp / 'texts'}]"], ("holds no .parquet files",)),
        "missing-data-path": ([f"data.train=[{tmp / 'gone'}]"], ("does not exist",)),
        "truncated-parquet": ([f"data.train=[{truncated.parent}]"], (str(truncated), "corrupted or truncated")),
        "garbage-parquet": ([f"data.train=[{garbage}]"], (str(garbage), "not a readable parquet file")),
        "missing-resume-path": ([f"run.resume={tmp / 'no-such-run'}"], ("no-such-run",)),
        "secret-in-config": (
            ["--config", str(write(tmp / "secret.yaml", "log:\n  wandb:\n    project: ${oc.env:WANDB_API_KEY,x}\n"))],
            ("WANDB_API_KEY",),
        ),
    }


CASE_NAMES = [
    "malformed-yaml",
    "duplicate-yaml-key",
    "unknown-yaml-key",
    "unknown-override",
    "unknown-section",
    "wrong-type-yaml",
    "wrong-type-override",
    "missing-config",
    "vocab-mismatch",
    "no-parquet-folder",
    "text-only-folder",
    "missing-data-path",
    "truncated-parquet",
    "garbage-parquet",
    "missing-resume-path",
    "secret-in-config",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_for_a_fresh_run(case, train_module, tiny_corpus, tmp_path, capsys):
    cases = fresh_cases(tmp_path / "inputs", tiny_corpus)
    assert set(cases) == set(CASE_NAMES)
    extra, needles = cases[case]
    run = tmp_path / "run"
    options = extra[:2] if extra[0] == "--config" else []  # options first, overrides after the run's own
    overrides = extra[len(options) :]
    code, err = cli(train_module, [*options, *tiny_run_args(run, tiny_corpus), *overrides], capsys)
    assert code == 2, err
    assert_one_sentence(err, *needles)
    assert not run.exists(), f"{case}: the run folder must not be created"


def test_bad_input_from_real_subprocesses(tiny_corpus, tmp_path):
    """The command lines themselves (train.py and launchers/submit.py), three bad inputs at once."""
    run = tmp_path / "run"
    bad_yaml = write(tmp_path / "bad.yaml", "model:\n  name: debug-recurrent\n   overrides: {}\n")
    truncated = tmp_path / "shard.parquet"
    truncated.write_bytes(Path(tiny_corpus.train[0]).read_bytes()[:5000])
    profile = write(
        tmp_path / "cluster.yaml",
        "description: no env field\nexecutor: local\nlaunch: task-per-device\ndevices_per_node: 1\n"
        "sbatch: {}\nsetup: []\n",
    )
    commands = {
        "yaml": [sys.executable, "train.py", "--config", str(bad_yaml), *tiny_run_args(run, tiny_corpus)],
        "parquet": [sys.executable, "train.py", *tiny_run_args(run, tiny_corpus), f"data.train=[{truncated}]"],
        "profile": [
            sys.executable,
            "launchers/submit.py",
            "--cluster",
            str(profile),
            "--dry-run",
            *tiny_run_args(run, tiny_corpus),
        ],
    }
    procs = {
        name: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    needles = {
        "yaml": ("bad.yaml", "not valid YAML", "line 3"),
        "parquet": ("shard.parquet", "corrupted or truncated"),
        "profile": ("cluster.yaml", "'env'", "missing"),
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, f"{name}: {proc.returncode}\n{out}\n{err}"
        assert_one_sentence(err, *needles[name])
        assert out == "", f"{name} printed a script or progress: {out}"
    assert not run.exists()


# ---------------------------------------------------------------------------------------------- resuming


def test_resuming_with_another_model_shape_is_refused(train_module, tiny_corpus, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    code, err = cli(train_module, tiny_run_args(run, tiny_corpus, *RESUMABLE, "model.overrides.n_embd=64"), capsys)
    assert code == 2
    assert_one_sentence(err, "different model shape", "n_embd 32 (checkpoint) vs 64 (this run)")
    assert snapshot(run) == before
    # the same checkpoint named explicitly from a fresh run folder
    other = tmp_path / "other"
    resume = f"run.resume={run / 'checkpoints' / 'step-00000004'}"
    code, err = cli(train_module, tiny_run_args(other, tiny_corpus, "model.overrides.n_embd=64", resume), capsys)
    assert code == 2
    assert_one_sentence(err, "different model shape")
    assert not other.exists()


def test_resuming_with_settings_that_cannot_resume_lists_every_differing_key(
    train_module, tiny_corpus, finished, tmp_path, capsys
):
    """The data order depends on the seed and the micro-batch; the optimizer state on the optimizer."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    changed = [
        "run.seed=8",
        "train.micro_batch_size=1",
        "data.weights=[1.0]",
        "optim.name=ellis-adam",
        "optim.no_decay=[norm]",
    ]
    code, err = cli(train_module, tiny_run_args(run, tiny_corpus, *RESUMABLE, *changed), capsys)
    assert code == 2, err
    assert_one_sentence(
        err,
        "run.seed 7 (checkpoint) vs 8 (this run)",
        "train.micro_batch_size 2 (checkpoint) vs 1 (this run)",
        "data.weights None (checkpoint) vs [1.0] (this run)",
        "optim.name 'adamw' (checkpoint) vs 'ellis-adam' (this run)",
        "optim.no_decay ['norm', 'bias', 'embedding'] (checkpoint) vs ['norm'] (this run)",
    )
    assert snapshot(run) == before
    # settings that may change between segments (a longer run, a new learning rate) still resume
    code_ok = train_module.main(tiny_run_args(run, tiny_corpus, *RESUMABLE, "train.max_steps=6", "optim.lr=1e-3"))
    assert code_ok == 0


def test_an_explicit_corrupt_checkpoint_is_refused(train_module, tiny_corpus, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    bad = run / "checkpoints" / "step-00000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-10])
    other = tmp_path / "other"
    code, err = cli(train_module, tiny_run_args(other, tiny_corpus, f"run.resume={bad.parent}"), capsys)
    assert code == 2
    assert_one_sentence(err, "step-00000004", "cannot be used")
    assert not other.exists()


def test_resuming_a_mixture_on_another_number_of_ranks_is_refused(train_module, tiny_corpus, tmp_path):
    """Since checkpoints reshard, another world size is a supported resume (tests/test_sharded_checkpoint.py);
    a weighted mixture still cannot continue exactly (its sources are drawn per rank batch). Under
    `torchrun --nproc_per_node 2` (gloo on the CPU) every rank refuses with the same sentence and exit code 2,
    and the run folder is unchanged."""
    run = tmp_path / "run"
    mixture = [f"data.train=[{tiny_corpus.train[0]},{tiny_corpus.train[0]}]", "data.weights=[1.0,2.0]"]
    assert train_module.main(tiny_run_args(run, tiny_corpus, *RESUMABLE, *mixture)) == 0
    before = snapshot(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["train.py", *tiny_run_args(run, tiny_corpus, *RESUMABLE, *mixture, "train.max_steps=6")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(e == errors[0] for e in errors), proc.stderr[-3000:]
    assert "saved by 1 ranks cannot be continued exactly by 2" in errors[0] and "mixture" in errors[0], errors[0]
    # torchrun prints its own report (with its own traceback); no rank died with one through train.py
    assert 'train.py", line' not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2 " in proc.stderr, proc.stderr[-3000:]  # torchrun stops the other rank when one exits
    assert snapshot(run) == before
