"""Shared fixtures: a tiny embedded corpus cached once for the whole session, train.py in-process.

RECPRE_CACHE points every test at one cache folder (kept between sessions under the system temp folder, so a
second `pytest` run reuses the corpus; set RECPRE_TEST_CACHE to move it). Tests never touch ~/.cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY_BLOCK = 32
TINY_FILES = 60  # stdlib files in the tiny corpus: ~250k training tokens, built in a few seconds

os.environ["RECPRE_CACHE"] = os.environ.get("RECPRE_TEST_CACHE") or str(
    Path(tempfile.gettempdir()) / f"recpre-test-cache-{os.getuid()}"
)
os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny test models gain nothing from a second thread, and tests that start several processes would
# oversubscribe a 2-core machine; subprocesses (train.py, torchrun, SLURM jobs) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_corpus():
    """The embedded corpus cut to a few stdlib files, at block size 32 (EmbeddedCorpus)."""
    from recpre.data.corpus import prepare_embedded_corpus

    return prepare_embedded_corpus(TINY_BLOCK, max_files=TINY_FILES, progress=False)


@pytest.fixture(scope="session")
def train_module():
    """train.py imported as a module, so tests call `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location("recpre_train_driver", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CHAT_BLOCK = 96


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_corpus, train_module):
    """A 2-step chat fine-tuning run (train.py in-process) on a few conversations."""
    root = tmp_path_factory.mktemp("sft")
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(40)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = tiny_run_args(root / "run", tiny_corpus)
    args = [a for a in args if not a.startswith(("data.train", "data.val", "model.overrides.block_size"))]
    args += [f"model.overrides.block_size={CHAT_BLOCK}", f"data.train=[{root / 'chat.jsonl'}]", "data.format=chat"]
    args += ["data.document_mask=true", f"data.cache_dir={root / 'cache'}", "train.max_steps=4", "eval.interval=0"]
    assert train_module.main(args) == 0
    return root / "run"


@contextlib.contextmanager
def signal_after_step(step: int):
    """A real SIGUSR2 (what SLURM sends before a time limit) right after training step `step` is logged: the
    driver saves at the step boundary and stops, as a preempted job does."""
    from recpre.monitor import Monitor

    original = Monitor.train

    def train_then_signal(self, row, **kw):
        original(self, row, **kw)
        if row["step"] == step:
            os.kill(os.getpid(), signal.SIGUSR2)

    Monitor.train = train_then_signal
    try:
        yield
    finally:
        Monitor.train = original


def tiny_run_args(run_dir: Path, corpus, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of a 32-wide recurrent model on the tiny corpus."""
    return [
        "run.name=tiny",
        f"run.out_dir={run_dir}",
        "run.seed=7",
        "model.overrides.n_embd=32",
        "model.overrides.n_heads=2",
        "model.overrides.intermediate_size=64",
        f"model.overrides.block_size={TINY_BLOCK}",
        "model.overrides.mean_recurrence=3",
        "model.overrides.mean_backprop_depth=1",
        f"data.train=[{corpus.train[0]}]",
        f"data.val=[{corpus.val[0]}]",
        f"data.tokenizer={corpus.tokenizer_dir}",
        "optim.lr=3e-3",
        "schedule.warmup_steps=2",
        "schedule.cooldown_steps=2",
        "schedule.min_lr=1e-4",
        "train.micro_batch_size=2",
        "train.world_batch_size=4",
        "train.max_steps=8",
        "eval.interval=4",
        "eval.max_batches=2",
        "eval.depths=[1,2]",
        "checkpoint.interval=4",
        "checkpoint.save_before_end_min=0",
        "log.progress=none",
        "log.plot=false",
        "log.interval=1",
        "fabric.device=cpu",
        *extra,
    ]
