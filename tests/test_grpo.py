"""GRPO through the driver (train.objective grpo): ratio 1 and KL 0 before the first update, exact resume of
rollouts and losses, the held-out evaluation rows and plot, and bad input refused in one sentence."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre.checkpoint import load_model
from recpre.errors import UserError
from recpre.settings import load_settings

REWARD = """
def length_reward(prompt, completion, example):
    # a reward that depends on what was sampled, so every group has a signal
    return float(len(completion) % 3)
"""


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "rewards"
    folder.mkdir()
    (folder / "grpo_test_rewards.py").write_text(textwrap.dedent(REWARD))
    monkeypatch.syspath_prepend(str(folder))
    return "grpo_test_rewards:length_reward"


def grpo_args(run_dir: Path, corpus, *extra: str) -> list[str]:
    """A seconds-long GRPO run of the 32-wide test model on the bundled task's prompts."""
    return tiny_run_args(
        run_dir, corpus,
        "train.objective=grpo", "model.overrides.block_size=96", "train.loss_spike_factor=null",
        "train.micro_batch_size=2", "train.world_batch_size=4", "train.max_steps=4",
        "schedule.name=constant", "schedule.warmup_steps=0", "schedule.cooldown_steps=0",
        "rl.group_size=4", "rl.max_new_tokens=5", "rl.kl_coef=0.1", "rl.updates_per_rollout=2",
        "rl.eval_max_prompts=4", "rl.eval_depths=[1,2]", "eval.interval=2", "checkpoint.interval=2",
        *extra,
    )  # fmt: skip


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ratio_is_one_and_kl_zero_before_the_first_update(train_module, tiny_corpus, tmp_path, reward_module):
    run = tmp_path / "run"
    assert train_module.main(grpo_args(run, tiny_corpus, f"rl.reward={reward_module}", "optim.lr=3e-2")) == 0
    steps = [r for r in rows(run) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0  # the reference is the initial model: identical log-probabilities
    assert all(r["ratio_deviation"] == 0.0 for r in steps)  # old log-probs = the update's first forward
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference
    assert any(r["clip_fraction"] > 0 for r in steps)  # the second update of a rollout is off-policy
    assert all(r["completion_length"] > 0 and r["depth"] == [2, 1] for r in steps)
    evaluations = [r for r in rows(run) if r.get("event") == "evaluation"]
    assert [e["step"] for e in evaluations] == [0, 2, 4]
    assert {"pass_at_1", "reward_depth_1", "reward_depth_2", "reward_depth_3"} <= set(evaluations[0])


def test_a_resumed_run_reproduces_the_rollouts_and_losses(train_module, tiny_corpus, tmp_path, reward_module):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = [f"rl.reward={reward_module}", "optim.lr=3e-2", "eval.interval=0"]
    assert train_module.main(grpo_args(whole, tiny_corpus, *args)) == 0
    assert train_module.main(grpo_args(parts, tiny_corpus, *args, "train.max_steps=2")) == 0
    assert train_module.main(grpo_args(parts, tiny_corpus, *args)) == 0
    keys = ("step", "loss", "reward", "kl", "clip_fraction", "completion_length", "grad_norm", "tokens")
    expected = [{k: r[k] for k in keys} for r in rows(whole) if "reward" in r]
    got = [{k: r[k] for k in keys} for r in rows(parts) if "reward" in r]
    assert got == expected
    assert len({r["reward"] for r in expected}) > 1  # the rollouts differ from step to step
    a, _ = load_model(whole)
    b, _ = load_model(parts)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("rl.depth=adaptive", "rl.depth"),
        ("rl.group_size=1", "rl.group_size"),
        ("rl.reward=nope", "rl.reward"),
        ("train.objective=ppo", "train.objective"),
        ("rl.clip_eps=0", "rl.clip_eps"),
    ],
)
def test_bad_rl_settings_are_refused(override: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        load_settings(REPO / "launch_configs" / "grpo-debug.yaml", [override])


def test_a_bad_reward_stops_the_run_before_its_folder_exists(tmp_path: Path) -> None:
    (tmp_path / "bad_rewards.py").write_text("def text(prompt, completion, example):\n    return 'yes'\n")
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "launch_configs" / "grpo-debug.yaml"),
           "run.init_from=null", f"run.out_dir={run}", "rl.reward=bad_rewards:text"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "reward function text returned 'yes'" in done.stderr and "What are the parameters" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not run.exists()


def test_grpo_debug_config_smoke(tmp_path: Path) -> None:
    """launch_configs/grpo-debug.yaml end to end, cut to two steps: rows, evaluations, plot, checkpoint."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "launch_configs" / "grpo-debug.yaml"),
           "run.init_from=null", f"run.out_dir={run}", "train.max_steps=2", "train.world_batch_size=4",
           "rl.group_size=4", "rl.max_new_tokens=8", "rl.eval_max_prompts=4", "eval.interval=2",
           "rl.eval_samples=2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "held-out pass@1" in done.stdout and "reward by depth 1:" in done.stdout
    got = rows(run)
    assert [r["step"] for r in got if "reward" in r] == [1, 2]
    evaluations = [r for r in got if r.get("event") == "evaluation"]
    assert [r["step"] for r in evaluations] == [0, 2]
    assert all(0 <= r["sampled_pass_at_1"] <= 1 for r in evaluations)
    assert (run / "checkpoints" / "latest").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run / "reward_by_depth.png").stat().st_size > 0


LOGGING_REWARD = """
import json, os

def logged(prompt, completion, example):
    with open(os.path.join(os.environ["GRPO_TEST_LOG"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps(example["qualname"]) + "\\n")
    return float(len(completion) % 2)
"""


def test_two_ranks_each_hold_whole_groups_of_different_prompts(tiny_corpus, tmp_path: Path) -> None:
    (tmp_path / "logging_rewards.py").write_text(LOGGING_REWARD)
    log = tmp_path / "log"
    log.mkdir()
    run = tmp_path / "run"
    args = grpo_args(run, tiny_corpus, "rl.reward=logging_rewards:logged", "train.max_steps=2", "eval.interval=0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train.py"), *args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1", "GRPO_TEST_LOG": str(log)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = {}
    for rank in (0, 1):
        names = [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()[1:]]  # not the probe
        assert len(names) == 2 * 2 * 4  # 2 steps x 2 prompts per rank x group of 4
        groups = [names[i : i + 4] for i in range(0, len(names), 4)]
        assert all(len(set(g)) == 1 for g in groups)  # a group's completions stay together on one rank
        seen[rank] = {g[0] for g in groups}
    assert not seen[0] & seen[1]
    assert [r["step"] for r in rows(run) if "reward" in r] == [1, 2]
