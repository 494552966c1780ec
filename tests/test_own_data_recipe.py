"""The README's "Your own data" recipe, run verbatim through bash on a small folder of files, ends in training;
when the data and the settings disagree, the error names what to change."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from recpre.data.pipeline import tokenize_corpus
from recpre.data.sources import iter_documents
from recpre.data.tokenizer import load_tokenizer
from recpre.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# what the test appends to the README's train command: a short run (the recipe's defaults train for minutes)
SHORT_RUN = "train.max_steps=2 train.world_batch_size=4 eval.max_batches=1 eval.depths=[1] log.plot=false"


def readme_recipe() -> list[str]:
    """The command lines of the README's "Your own data" code block, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def make_corpus(folder: Path) -> None:
    """Real files of mixed kinds: Python sources, extensionless text, two binaries and a hidden file."""
    (folder / "notes").mkdir(parents=True)
    for name in ("textwrap.py", "string.py", "glob.py"):
        shutil.copyfile(STDLIB / name, folder / name)
    shutil.copyfile(STDLIB / "LICENSE.txt", folder / "LICENSE")
    shutil.copyfile(STDLIB / "json" / "decoder.py", folder / "notes" / "README")
    pyc = next((STDLIB / "__pycache__").glob("textwrap.*.pyc"), None) or next((STDLIB / "__pycache__").iterdir())
    shutil.copyfile(pyc, folder / "blob")  # compiled code without an extension
    (folder / "logo.png").write_bytes(bytes(range(256)) * 8)
    (folder / ".DS_Store").write_text("hidden files are left out\n", encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A checkout-like folder: the README's relative paths (scripts/, train.py, corpus/) resolve in it."""
    work = tmp_path_factory.mktemp("own-data")
    (work / "scripts").symlink_to(REPO / "scripts")
    (work / "train.py").symlink_to(REPO / "train.py")
    (work / "bin").mkdir()
    (work / "bin" / "python").symlink_to(sys.executable)
    make_corpus(work / "corpus")
    return work


def bash(work: Path, line: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(workdir) -> dict[str, subprocess.CompletedProcess]:
    """The recipe's data commands (all but the last line, the training run), verbatim."""
    *data_steps, train = readme_recipe()
    assert train.startswith("python train.py ")
    done = {}
    for line in data_steps:
        proc = bash(workdir, line)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        done[line.split()[1]] = proc
    return done


@pytest.mark.slow
def test_readme_recipe_trains_on_a_small_folder(workdir, prepared):
    tok = prepared["scripts/build_tokenizer.py"].stdout
    assert "skipped 2 files that are not UTF-8 text" in tok and "corpus/blob" in tok and "corpus/logo.png" in tok
    packed = prepared["scripts/tokenize_corpus.py"].stdout
    assert "5 documents" in packed  # 3 .py files, LICENSE, notes/README; not the binaries, not .DS_Store
    split = json.loads((workdir / "data" / "shuffled" / "manifest.json").read_text())
    assert split["val"]["rows"] >= 4  # a 1% split of this corpus is 1 row; the default run validates 4 at a time

    train = readme_recipe()[-1]
    proc = bash(workdir, f"{train} {SHORT_RUN}")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (workdir / "runs" / "debug" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(math.isfinite(r.get("val_loss", math.nan)) for r in rows)


def run_train(work: Path, *overrides: str) -> subprocess.CompletedProcess:
    data = "data.train=[data/shuffled/train] data.val=[data/shuffled/val] data.tokenizer=data/tokenizer"
    return bash(work, f"python train.py {data} run.out_dir=runs/bad {' '.join(overrides)}")


def test_block_size_mismatch_says_what_to_change(workdir, prepared):
    proc = run_train(workdir, "model.overrides.vocab_size=8192", "model.overrides.block_size=128")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--block-size 128" in proc.stderr and "model.overrides.block_size=256" in proc.stderr
    assert not (workdir / "runs" / "bad").exists()


def test_too_small_splits_say_what_to_change(workdir, prepared):
    val_rows = json.loads((workdir / "data" / "shuffled" / "manifest.json").read_text())["val"]["rows"]
    proc = run_train(workdir, "model.overrides.vocab_size=8192", f"eval.micro_batch_size={2 * val_rows}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "validation data" in proc.stderr and f"eval.micro_batch_size={val_rows}" in proc.stderr
    assert f"--min-val-rows {2 * val_rows}" in proc.stderr and "eval.interval=0" in proc.stderr

    proc = run_train(workdir, "model.overrides.vocab_size=8192", "train.micro_batch_size=64 train.world_batch_size=64")
    assert proc.returncode == 2 and "training data" in proc.stderr and "train.micro_batch_size=" in proc.stderr


def test_shuffle_raises_a_small_validation_split_and_says_so(workdir, prepared):
    out = prepared["scripts/shuffle.py"].stdout
    assert "--min-val-rows" in out  # the 1% split was raised, and the output says by which flag
    proc = bash(workdir, "python scripts/shuffle.py --input data/packed --output data/exact --val-fraction 0.01 "
                "--seed 0 --min-val-rows 0")  # fmt: skip
    assert proc.returncode == 0 and "val 1 rows" in proc.stdout, proc.stderr


def test_folder_reads_text_of_any_name_and_counts_binaries(tmp_path, tiny_corpus):
    make_corpus(tmp_path / "corpus")
    skipped: set[Path] = set()
    docs = list(iter_documents(tmp_path / "corpus", skipped=skipped))
    assert len(docs) == 5 and (STDLIB / "LICENSE.txt").read_text(encoding="utf-8") in docs
    assert {p.name for p in skipped} == {"blob", "logo.png"}
    with pytest.raises(UserError, match="logo.png is not UTF-8 text"):  # a file named on its own must be text
        list(iter_documents(tmp_path / "corpus" / "logo.png"))

    only_binary = tmp_path / "binaries"
    only_binary.mkdir()
    shutil.copyfile(tmp_path / "corpus" / "logo.png", only_binary / "logo.png")
    with pytest.raises(UserError, match="holds no documents .skipped 1 file that is not UTF-8 text"):
        tokenize_corpus([only_binary], load_tokenizer(tiny_corpus.tokenizer_dir), 16, tmp_path / "out")
    assert not (tmp_path / "out").exists()
