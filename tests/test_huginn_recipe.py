"""The Frontier recipe (launch_configs/nebel-raven-3.5b-frontier.yaml) against the reference's Frontier run.

REFERENCE is transcribed from launch_configs/frontier_nebel_512_nodes.yaml of github.com/seal-rg/recurrent-pretraining
at commit 59e0b69b2d96a59cbbe79c9d5034d89ecb5ab6f6, with the defaults it relies on: `CLISettings.grad_clip` 1.0 and
`fabric_precision` "bf16-mixed" (recpre/settings.py there), ELLISAdam's eps 1e-6 (recpre/optim.py there; the YAML
leaves eps out), `get_param_groups(no_wd_on_embedding=False)` (the tied embedding decays), and the registry's
nebel-raven-3.5b sampling scheme. DEVIATIONS are the values recpre's recipe changes on purpose; each carries a
"differs" comment in the YAML and an entry in docs/huginn.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from recpre.config import ModelConfig
from recpre.model import build_model
from recpre.optim import build_optimizer
from recpre.schedules import learning_rate
from recpre.settings import DEFAULT_CONFIG, load_settings

RECIPE = DEFAULT_CONFIG.parent / "nebel-raven-3.5b-frontier.yaml"
DOCS = Path(__file__).parent.parent / "docs" / "huginn.md"

REFERENCE = {
    "run.seed": 233,
    "model.name": "nebel-raven-3.5b",
    "model.activation_checkpointing": True,  # gradient_checkpointing: True
    "model.compile": True,  # compile_model: True
    "model.fused_head": "none",  # use_fused_head: pytorch
    "optim.name": "ellis-adam",  # ELLISAdam with atan_adam, running_init
    "optim.lr": 4e-5,
    "optim.weight_decay": 4e-5,  # decouple_wd: True
    "optim.beta1": 0.9,
    "optim.beta2": 0.95,
    "optim.eps": 1e-6,
    "optim.update_clipping": True,
    "optim.no_decay": ["norm", "bias"],  # no_weight_decay_for_bias_and_norm_params: True; embedding decayed
    "schedule.name": "trapezoid",
    "schedule.warmup_steps": 4096,
    "schedule.cooldown_steps": 4096,
    "schedule.min_lr": 0.0,
    "schedule.batch_size_ramp": 0,
    "train.max_tokens": 4_000_000_000_000,
    "train.micro_batch_size": 1,
    "train.world_batch_size": 4096,
    "train.grad_clip": 1.0,
    "fabric.strategy": "simple-ddp",
    "fabric.precision": "bf16-mixed",
    "log.interval": 4,  # log_step_interval
    "eval.interval": 128,  # eval_step_interval
    "eval.depths": [1, 4, 8, 16, 64],  # partial_depth_eval
    "checkpoint.interval": 128,  # save_step_interval
    "checkpoint.save_before_end_min": 5.0,  # save_n_min_before_job_done
}
REFERENCE_SHAPE = {"sampling_scheme": "poisson-lognormal-filling", "mean_recurrence": 32, "mean_backprop_depth": 8}
DEVIATIONS = {
    "model.compile": "ROCm compile start-up over 12-hour segments",
    "model.fused_head": "same loss, less memory",
    "schedule.cooldown_steps": "the published run stopped long before the reference's cooldown",
    "train.max_tokens": "the published run's 800B tokens, not the reference's placeholder 4T",
    "checkpoint.save_before_end_min": "room to write the 3.5B state",
}


@pytest.fixture()
def recipe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATA_DIR", "/lustre/data/recpre")
    return load_settings(RECIPE, [])


def resolved(settings, key: str):
    section, name = key.split(".")
    return getattr(getattr(settings, section), name)


def commented_differs(key: str) -> bool:
    """The YAML line of `key` (or the comment block right above it) says why it differs."""
    lines = RECIPE.read_text().splitlines()
    leaf = key.split(".")[1]
    for i, line in enumerate(lines):
        if re.match(rf"^\s+{leaf}:", line):
            above = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                above.append(lines[j])
                j -= 1
            return "differs" in line or any("differs" in x for x in above)
    return False


def test_recipe_equals_the_reference_except_the_listed_deviations(recipe):
    for key, value in REFERENCE.items():
        if key in DEVIATIONS:
            assert resolved(recipe, key) != value, f"{key} no longer differs: drop it from DEVIATIONS"
            assert commented_differs(key), f"{key} differs from the reference without a 'differs' comment"
        else:
            assert resolved(recipe, key) == value, key
    shape = ModelConfig.from_name(recipe.model.name, **recipe.model.overrides)
    assert {k: getattr(shape, k) for k in REFERENCE_SHAPE} == REFERENCE_SHAPE
    assert shape.lockstep  # lockstep_n / lockstep_k: True
    text = DOCS.read_text()
    for key in DEVIATIONS:
        assert f"`{key}`" in text, f"docs/huginn.md does not list the deviation {key}"


def test_weight_decay_is_applied_as_the_reference_applies_it(recipe):
    """Embedding (tied head) decayed; norms and q/k biases not; the per-step factor 1 - (lr/lr0) wd."""
    config = ModelConfig.from_name("huginn-tiny")
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(model, recipe.optim)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay_of[id(params["transformer.wte.weight"])] == 4e-5
    assert decay_of[id(params["transformer.core_block.0.attn.Wqkv.weight"])] == 4e-5
    assert decay_of[id(params["transformer.core_block.0.norm_1.weight"])] == 0.0
    assert decay_of[id(params["transformer.core_block.0.attn.qk_bias"])] == 0.0
    # one step with zero gradients on a decayed matrix: only the decay acts, at the reference's factor
    w = params["transformer.adapter.weight"]
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * 0.5  # half way through warmup
    optimizer.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.5 * 4e-5), rtol=0, atol=1e-12)


def reference_lr(step: int, max_steps: int) -> float:
    """get_lr of the reference's train.py (trapezoid, warmup 4096, cooldown 4096, min_lr 0)."""
    base, warmup, cooldown = 4e-5, 4096, 4096
    if step < warmup:
        return base * step / warmup
    if step > max_steps - cooldown:
        return max(base * (max_steps - step) / cooldown, 0.0)
    return base


def test_applied_learning_rates_equal_the_reference_warmup(recipe):
    """The reference skips its first optimizer step (train.py: `if state["optimizer_step"] > 0`), whose scheduled
    lr is 0 anyway: its applied updates t = 1, 2, ... use lr t/4096; recpre's t = 0, 1, ... use (t+1)/4096."""
    total = recipe.train.max_tokens // (recipe.train.world_batch_size * 4096)
    s = recipe.schedule
    for t in (0, 1, 2, 100, 4094, 4095, 4096, 20_000, total - 1):
        ours = learning_rate(t, base_lr=4e-5, total_steps=total, name=s.name, warmup_steps=s.warmup_steps,
                             cooldown_steps=s.cooldown_steps, min_lr=s.min_lr)  # fmt: skip
        assert ours == pytest.approx(reference_lr(t + 1, max_steps=4_000_000_000_000 // (4096 * 4096)), rel=1e-12)
