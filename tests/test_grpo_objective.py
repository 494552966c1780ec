"""The GRPO objective's math (recpre/rl/objective.py) and the reward checks (recpre/rl/rewards.py)."""

from __future__ import annotations

import math

import pytest
import torch

from recpre.errors import UserError
from recpre.rl.objective import clipped_token_loss, group_advantages, k3_kl, token_log_probs
from recpre.rl.rewards import resolve_reward, score
from recpre.rl.tasks import first_parameter, first_parameter_reward, first_parameter_rows


def test_group_advantages_on_a_hand_made_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]
    assert adv[:4].tolist() == pytest.approx(expected, rel=1e-3)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group that agrees carries no signal
    std3 = torch.tensor([0.0, 0.0, 0.0, 3.0]).std().item()
    assert adv[8:].tolist() == pytest.approx([-0.75 / std3] * 3 + [2.25 / std3], rel=1e-3)
    dr = group_advantages(rewards, 4, scale_rewards=False)  # Dr. GRPO: centred only
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])
    with pytest.raises(ValueError):
        group_advantages(rewards, 5)


def _grad(ratio: float, advantage: float, clip_eps: float = 0.2) -> float:
    old = torch.zeros(1, 1)
    log_probs = torch.full((1, 1), math.log(ratio), requires_grad=True)
    terms = clipped_token_loss(log_probs, old, torch.tensor([advantage]), clip_eps=clip_eps)
    terms.loss.sum().backward()
    return float(log_probs.grad)


def test_the_clipped_objective_has_no_gradient_beyond_the_clip_range() -> None:
    assert _grad(1.5, 1.0) == 0.0  # ratio above 1 + eps, advantage pushing it higher: clipped
    assert _grad(0.5, -1.0) == 0.0  # ratio below 1 - eps, advantage pushing it lower: clipped
    assert _grad(1.1, 1.0) == pytest.approx(-1.1)  # inside the range: d(-ratio * A)/dlogp = -ratio * A
    assert _grad(0.5, 1.0) == pytest.approx(-0.5)  # the pessimistic branch is the unclipped one
    assert _grad(1.5, -1.0) == pytest.approx(1.5)


def test_clip_fraction_counts_the_clipped_tokens() -> None:
    log_probs = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    terms = clipped_token_loss(log_probs, torch.zeros(1, 4), torch.tensor([1.0]), clip_eps=0.2)
    assert terms.clipped.tolist() == [[False, True, False, False]]
    assert terms.ratio[0].tolist() == pytest.approx([1.0, 1.5, 0.5, 1.1])


def test_k3_kl_is_zero_for_the_same_policy_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    lp = token_log_probs(logits, targets, vocab_size=11)
    assert torch.equal(k3_kl(lp, lp.clone()), torch.zeros_like(lp))
    other = token_log_probs(logits * 1.5, targets, vocab_size=11)
    assert (k3_kl(lp, other) > 0).any() and (k3_kl(lp, other) >= 0).all()
    terms = clipped_token_loss(lp, lp, torch.zeros(2), clip_eps=0.2, ref_log_probs=other, kl_coef=0.5)
    assert torch.allclose(terms.loss, 0.5 * k3_kl(lp, other))


def test_log_probs_skip_padded_vocabulary_and_use_the_temperature() -> None:
    logits = torch.tensor([[[0.0, 1.0, 50.0]]])  # the third entry is a padded vocabulary row
    lp = token_log_probs(logits, torch.tensor([[1]]), vocab_size=2, temperature=0.5)
    assert float(lp) == pytest.approx(math.log(math.exp(2) / (1 + math.exp(2))))


def test_a_reward_that_raises_names_the_prompt_and_a_non_number_is_refused() -> None:
    def broken(prompt, completion, example):
        raise KeyError("answer")

    with pytest.raises(UserError, match=r"broken raised KeyError.*What is `json.dumps`"):
        score(broken, "What is `json.dumps`?", "x", {})
    for bad in ("1.0", None, float("nan"), [1.0]):
        with pytest.raises(UserError, match="not a finite number"):
            score(lambda p, c, e, value=bad: value, "What is `json.dumps`?", "x", {})
    assert score(lambda p, c, e: 1, "p", "c", {}) == 1.0


def test_reward_names_resolve_or_are_refused_in_one_sentence() -> None:
    assert resolve_reward("first-parameter") is first_parameter_reward
    assert resolve_reward("recpre.rl.tasks:first_parameter_reward") is first_parameter_reward
    for spec, words in (("nope", "neither a built-in"), ("no_such_module_x:f", "cannot be imported"),
                        ("recpre.rl.tasks:missing", "has no function")):  # fmt: skip
        with pytest.raises(UserError, match=words):
            resolve_reward(spec)


def test_the_bundled_task_rewards_the_first_parameter_only() -> None:
    train, held_out = first_parameter_rows()
    assert len(train) > 300 and len(held_out) > 30
    assert not {r["qualname"] for r in train} & {r["qualname"] for r in held_out}
    example = {"qualname": "json.dumps", "first_parameter": "obj"}
    assert first_parameter_reward("", "`json.dumps(obj, *, skipkeys=False", example) == 1.0
    assert first_parameter_reward("", "`json.dumps(obj", example) == 1.0
    assert first_parameter_reward("", "`json.dumps(fp, obj", example) == 0.0  # format alone earns nothing
    assert first_parameter_reward("", "`json.dumps(objects", example) == 0.0  # the name exactly
    assert first_parameter_reward("", "`json.dumps(", example) == 0.0
    assert first_parameter_reward("", "json.dumps obj", example) == 0.0
    assert first_parameter("`os.path.join(a, *p)`") == "a"
    assert first_parameter("`f(*args, **kw)`") == "*args"
    assert first_parameter("`f(*, key)`") is None


def test_the_bundled_task_starts_each_answer_and_rewards_what_follows() -> None:
    train, held_out = first_parameter_rows()
    row = next(r for r in train + held_out if r["qualname"] == "json.dumps")
    assert row["answer_prefix"] == "`json.dumps("
    assert first_parameter_reward("", "obj, *, skipkeys=False", row) == 1.0
    assert first_parameter_reward("", "obj", row) == 1.0
    assert first_parameter_reward("", "fp", row) == 0.0
    assert first_parameter_reward("", "", row) == 0.0  # the prefix alone (the format) earns nothing
    assert first_parameter_reward("", ")", row) == 0.0


def test_a_prompt_row_answer_prefix_is_written_after_the_generation_prompt(tmp_path) -> None:
    import json

    from recpre.data.chat_template import load_chat_template
    from recpre.rl.prompts import prompt_text, read_prompt_rows

    good = {"messages": [{"role": "user", "content": "Hi?"}], "answer_prefix": "`os.path.join("}
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "2 + 2 =", "answer_prefix": " "}) + "\n")
    rows = read_prompt_rows(path, "rl.prompts")
    texts = [prompt_text(r, load_chat_template("plain"), {}) for r in rows]
    assert texts == ["<|user|>\nHi?<|assistant|>\n`os.path.join(", "2 + 2 = "]
    path.write_text(json.dumps({"prompt": "x", "answer_prefix": 3}) + "\n")
    with pytest.raises(UserError, match="line 1 has an `answer_prefix` that is not a string"):
        read_prompt_rows(path, "rl.prompts")
