"""train.py on an XLA device (XLA on CPU here, PJRT_DEVICE=CPU): issue 9's acceptance checks.

- the debug recurrent model (tiny overrides) trains for 20 steps with sampled depths varying, and the number of
  compiled graphs is <= 4 and constant from the first step on;
- its losses match the CPU eager run of the same seed (fp32);
- `train.py --compile-sweep` visits the same graphs in 3 steps and writes no checkpoint;
- a run resumed from a checkpoint written through the CPU continues exactly.

Runs in the XLA virtual environment (scripts/make_xla_env.sh, then
`PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/xla -q`); skips elsewhere with the reason.
Each run is its own process: XLA's compile counter is per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_run_args

pytestmark = [pytest.mark.xla, pytest.mark.slow]

if importlib.util.find_spec("torch_xla") is None:
    pytest.skip(
        "torch_xla is not installed: run in the XLA env (bash scripts/make_xla_env.sh; PJRT_DEVICE=CPU "
        ".venv-xla/bin/python -m pytest tests/xla)",
        allow_module_level=True,
    )

MAX_GRAPHS = 4  # prelude, one no-grad core iteration, the training step, the start-up graph (prepare_training)
XLA = ["fabric.strategy=xla", "fabric.device=auto"]
# Accumulation 1, mean depth 4 with 2 backpropagated iterations, no validation: the graphs of the training step.
SHAPE = [
    "train.world_batch_size=2",
    "model.overrides.mean_recurrence=4",
    "model.overrides.mean_backprop_depth=2",
    "eval.interval=0",
    "checkpoint.interval=0",
]


def _train(run_dir: Path, corpus, *extra: str, flags: tuple[str, ...] = ()) -> list[dict]:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(REPO / "train.py"), *flags, *tiny_run_args(run_dir, corpus, *SHAPE, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out_dir = run_dir / "compile-sweep" if "--compile-sweep" in flags else run_dir
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_compile_count_stays_constant_across_sampled_depths(tiny_corpus, tmp_path):
    rows = _train(tmp_path / "xla", tiny_corpus, *XLA, "train.max_steps=20")
    assert [r["step"] for r in rows] == list(range(1, 21))
    depths = [tuple(r["depth"]) for r in rows]
    graphs = [r["xla_graphs"] for r in rows]
    print("depths (n, k):", depths, "\ncompiled graphs after each step:", graphs)
    assert len({n for n, _ in depths}) >= 4, f"the sampled depths hardly vary: {depths}"
    assert {k for _, k in depths} == {2}
    assert graphs == [graphs[0]] * len(graphs), f"graphs kept compiling: {graphs}"
    assert graphs[-1] <= MAX_GRAPHS
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    # The final checkpoint went through the CPU and loads anywhere.
    assert (tmp_path / "xla" / "checkpoints" / "latest").is_file()


def test_losses_match_cpu_eager(tiny_corpus, tmp_path):
    # poisson-fill keeps k fixed by itself, so both runs draw exactly the same depths; zero initial state,
    # because XLA's random stream differs from the CPU's.
    same = ["train.max_steps=8", "model.overrides.sampling_scheme=poisson-fill", "model.overrides.state_init=zero"]
    cpu = _train(tmp_path / "cpu", tiny_corpus, *same)
    xla = _train(tmp_path / "xla", tiny_corpus, *XLA, *same)
    assert [r["depth"] for r in xla] == [r["depth"] for r in cpu]
    print("cpu losses:", [r["loss"] for r in cpu], "\nxla losses:", [r["loss"] for r in xla])
    np.testing.assert_allclose([r["loss"] for r in xla], [r["loss"] for r in cpu], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in xla], [r["grad_norm"] for r in cpu], rtol=1e-3)


def test_compile_sweep_visits_the_training_graphs_without_a_checkpoint(tiny_corpus, tmp_path):
    rows = _train(tmp_path / "run", tiny_corpus, *XLA, "train.max_steps=20", flags=("--compile-sweep",))
    assert len(rows) == 3
    assert {r["depth"][0] for r in rows} >= {0, 2}
    assert rows[-1]["xla_graphs"] <= MAX_GRAPHS
    assert not (tmp_path / "run" / "compile-sweep" / "checkpoints").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_on_xla_continues_exactly(tiny_corpus, tmp_path):
    """Checkpoints written through the CPU and read back onto the device: 4 + 2 steps equal 6 in one go."""
    # constant LR: the schedule of a 4-step run would otherwise cool down early
    same = ["model.overrides.state_init=zero", "schedule.name=constant", "checkpoint.interval=4", *XLA]
    whole = _train(tmp_path / "whole", tiny_corpus, *same, "train.max_steps=6")
    _train(tmp_path / "split", tiny_corpus, *same, "train.max_steps=4")
    resumed = _train(tmp_path / "split", tiny_corpus, *same, "train.max_steps=6")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # metrics.jsonl holds both segments
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=1e-6)
