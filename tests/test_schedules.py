"""Learning-rate schedules and the batch-size ramp: pure functions of the step."""

from __future__ import annotations

import math

import pytest

from recpre.errors import UserError
from recpre.schedules import BatchPlan, learning_rate


def lrs(name: str, total: int = 100, **kw) -> list[float]:
    kw.setdefault("warmup_steps", 10)
    return [learning_rate(s, base_lr=1.0, total_steps=total, name=name, **kw) for s in range(total)]


def test_warmup_is_linear_up_to_the_peak():
    values = lrs("constant")
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert values[10:] == [1.0] * 90


def test_trapezoid_holds_then_cools_down_to_min_lr():
    values = lrs("trapezoid", cooldown_steps=20, min_lr=0.1)
    assert values[10:80] == [1.0] * 70
    cooldown = values[80:]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    assert cooldown[-1] == pytest.approx(0.1 + 0.9 / 20)
    assert learning_rate(100, base_lr=1.0, total_steps=100, cooldown_steps=20, min_lr=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decays_start_at_peak_and_end_near_min_lr(name):
    values = lrs(name, min_lr=0.2)
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert 0.2 <= values[-1] < 0.25
    assert learning_rate(100, base_lr=1.0, total_steps=100, name=name, warmup_steps=10, min_lr=0.2) == pytest.approx(
        0.2
    )


def test_cosine_midpoint():
    mid = learning_rate(55, base_lr=1.0, total_steps=100, name="cosine", warmup_steps=10, min_lr=0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="schedule.name"):
        learning_rate(0, base_lr=1.0, total_steps=10, name="exponential")


def test_accumulation_without_ramp():
    plan = BatchPlan(world_batch_size=32, micro_batch_size=4, world_size=2, block_size=8)
    assert plan.accumulation_steps(0) == 4
    assert plan.tokens_in_step(5) == 32 * 8
    assert plan.total_steps(10, None) == 10
    assert plan.total_steps(None, 32 * 8 * 7) == 7


def test_ramp_keeps_integer_accumulation_and_grows_monotonically():
    plan = BatchPlan(32, 2, 2, block_size=16, ramp_steps=10, ramp_start_batch_size=4)
    accum = [plan.accumulation_steps(s) for s in range(12)]
    assert accum[0] == 1 and accum[-1] == 8 and accum[10] == 8
    assert all(isinstance(a, int) and a >= 1 for a in accum)
    assert all(a <= b for a, b in zip(accum, accum[1:]))
    assert plan.tokens_before(12) == sum(plan.tokens_in_step(s) for s in range(12))


@pytest.mark.parametrize("max_tokens_units", [1, 3, 17, 40, 41, 200])
def test_max_tokens_is_exact_with_a_ramp(max_tokens_units):
    plan = BatchPlan(16, 2, 1, block_size=8, ramp_steps=6, ramp_start_batch_size=2)
    max_tokens = max_tokens_units * plan.unit_tokens
    steps = plan.total_steps(None, max_tokens)
    consumed = [plan.accumulation_steps_within(s, max_tokens) * plan.unit_tokens for s in range(steps)]
    assert all(c > 0 for c in consumed)
    assert sum(consumed) == max_tokens
    assert plan.accumulation_steps_within(steps, max_tokens) == 0


def test_max_tokens_rounds_down_to_whole_micro_batches():
    plan = BatchPlan(8, 2, 1, block_size=8)
    max_tokens = 5 * plan.unit_tokens + 7
    steps = plan.total_steps(None, max_tokens)
    total = sum(plan.accumulation_steps_within(s, max_tokens) * plan.unit_tokens for s in range(steps))
    assert total == 5 * plan.unit_tokens


def test_max_steps_and_max_tokens_first_one_wins():
    plan = BatchPlan(8, 2, 1, block_size=8)
    assert plan.total_steps(3, 10 * 8 * 8) == 3
    assert plan.total_steps(30, 10 * 8 * 8) == 10


def test_bad_batch_sizes_are_user_errors():
    with pytest.raises(UserError, match="world_batch_size"):
        BatchPlan(10, 4, 1, block_size=8)
    with pytest.raises(UserError, match="max_steps or train.max_tokens"):
        BatchPlan(8, 4, 1, block_size=8).total_steps(None, None)
    with pytest.raises(UserError, match="max_tokens"):
        BatchPlan(8, 4, 1, block_size=8).total_steps(None, 3)
