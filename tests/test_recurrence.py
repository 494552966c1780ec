"""Recurrence policy: shape defaults, train.recurrence overrides, curricula, and draws that depend on the
global micro-batch, not the rank."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.recurrence import RecurrencePolicy, ramp_fraction, sample_depth
from recpre.settings import load_settings
from recpre.step_backends import EagerStep
from recpre.train_step import Trainer


def policy(*overrides: str) -> RecurrencePolicy:
    settings = load_settings(None, list(overrides))
    config = ModelConfig.from_name(settings.model.name, **settings.model.overrides)
    return RecurrencePolicy.from_settings(settings.train.recurrence, config)


def test_null_keys_take_the_shapes_defaults_and_set_keys_override_them():
    shape = ModelConfig.from_name("debug-recurrent")
    p = policy()
    assert (p.mean, p.backprop_depth, p.sampling, p.lockstep) == (
        shape.mean_recurrence,
        shape.mean_backprop_depth,
        shape.sampling_scheme,
        shape.lockstep,
    )
    p = policy("train.recurrence.mean=8", "train.recurrence.backprop_depth=3", "train.recurrence.sampling=fixed")
    assert (p.mean, p.backprop_depth, p.sampling) == (8, 3, "fixed")
    assert p.depth(0, 0, 0) == (5, 3)
    assert (
        RecurrencePolicy.from_settings(load_settings(None, []).train.recurrence, ModelConfig.from_name("debug-gpt"))
        is None
    )


def test_curriculum_ramps_follow_their_formulas():
    assert ramp_fraction("linear", 25, 100) == pytest.approx(0.25)
    assert ramp_fraction("sqrt", 25, 100) == pytest.approx(1 - math.sqrt(0.75))
    assert ramp_fraction("constant", 0, 100) == 1.0 and ramp_fraction("linear", 150, 100) == 1.0
    p = policy(
        "train.recurrence.mean=16",
        "train.recurrence.backprop_depth=8",
        "train.recurrence.curriculum.name=linear",
        "train.recurrence.curriculum.steps=100",
        "train.recurrence.curriculum.start_mean=4",
        "train.recurrence.curriculum.start_backprop_depth=2",
    )
    assert p.spec_at(0).mean_recurrence == 4 and p.spec_at(0).mean_backprop_depth == 2
    assert p.spec_at(50).mean_recurrence == pytest.approx(10) and p.spec_at(50).mean_backprop_depth == 5
    assert p.spec_at(100).mean_recurrence == 16 and p.spec_at(400).mean_backprop_depth == 8
    assert p.backprop_depths(1000) == list(range(2, 9))


@pytest.mark.parametrize("name", ["linear", "sqrt"])
def test_sampled_depths_running_mean_follows_the_ramp(name):
    """Many global micro-batches per step (lockstep off): their mean depth tracks the curriculum's mean + 1
    (poisson-lognormal-filling has E[r] = mean + 1)."""
    p = policy(
        "train.recurrence.mean=32",
        "train.recurrence.backprop_depth=8",
        "train.recurrence.lockstep=false",
        f"train.recurrence.curriculum.name={name}",
        "train.recurrence.curriculum.steps=40",
        "train.recurrence.curriculum.start_mean=4",
        "train.recurrence.curriculum.start_backprop_depth=1",
    )
    for step in (0, 10, 20, 30, 40, 60):
        target = 4 + (32 - 4) * ramp_fraction(name, step, 40)
        draws = np.array([sum(p.depth(step, g, seed=3)) for g in range(step * 4000, step * 4000 + 4000)])
        assert draws.mean() == pytest.approx(target + 1, rel=0.03), (step, draws.mean(), target)
        k = {p.depth(step, g, seed=3)[1] for g in range(200)}
        assert max(k) == p.spec_at(step).mean_backprop_depth


@pytest.mark.parametrize("lockstep", [True, False])
def test_depth_and_noise_of_a_micro_batch_do_not_depend_on_how_ranks_split_the_step(lockstep):
    """Global micro-batch g = first + rank + world * i: the same g gets the same depth and noise seed
    whatever the world size."""
    p = RecurrencePolicy(mean=6, backprop_depth=2, sampling="poisson-lognormal-filling", lockstep=lockstep)
    config = ModelConfig.from_name("debug-recurrent")

    def draws(world: int, step: int, first: int, micro: int) -> dict[int, tuple]:
        out = {}
        for rank in range(world):
            fabric = SimpleNamespace(rank=rank, world_size=world)
            t = Trainer(SimpleNamespace(parameters=lambda: []), None, fabric, EagerStep(), config, p, seed=11)
            for i in range(micro):
                g = first + rank + world * i
                out[g] = (t.micro_depth(step, g, i), t.noise_key(step, g, i))
        return out

    one = draws(1, step=5, first=40, micro=8)
    assert draws(2, 5, 40, 4) == one == draws(4, 5, 40, 2) == draws(8, 5, 40, 1)
    assert len({v[1] for v in one.values()}) == 8  # every micro-batch its own noise
    if lockstep:
        assert len({v[0] for v in one.values()}) == 1  # one depth for the whole optimizer step


def test_rank_replicated_noise_gives_every_rank_the_same_stream():
    p = RecurrencePolicy(mean=6, backprop_depth=2, sampling="fixed", lockstep=True, state_noise="rank-replicated")
    config = ModelConfig.from_name("debug-recurrent")
    keys = set()
    for rank in range(4):
        fabric = SimpleNamespace(rank=rank, world_size=4)
        t = Trainer(SimpleNamespace(parameters=lambda: []), None, fabric, EagerStep(), config, p, seed=11)
        keys.add(t.noise_key(3, 12 + rank, 0))
    assert len(keys) == 1


def test_the_old_sampler_signature_still_draws_per_shape():
    c = ModelConfig.from_name("debug-recurrent", lockstep=False)
    assert [sample_depth(c, s, 3, 1) for s in range(20)] == [sample_depth(c, s, 3, 1) for s in range(20)]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.recurrence.curriculum.name=cubic", "train.recurrence.curriculum.name"),
        ("train.recurrence.sampling=uniform", "train.recurrence.sampling"),
        ("train.recurrence.backprop_depth=0", "train.recurrence.backprop_depth"),
        ("train.recurrence.curriculum.name=linear", "train.recurrence.curriculum.steps"),
        ("train.recurrence.state_noise=shared", "train.recurrence.state_noise"),
    ],
)
def test_bad_recurrence_settings_name_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_settings(None, [override])
