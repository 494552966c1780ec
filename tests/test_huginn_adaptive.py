"""Adaptive exit and bf16 rounding against the Huginn reference implementation's own outputs.

The fixtures (tests/fixtures/huginn-adaptive, tests/fixtures/huginn-tiny/expected-bf16.safetensors) were made by
running the reference (recpre/raven_modeling_minimal.py of github.com/seal-rg/recurrent-pretraining at commit
59e0b69b2d96a59cbbe79c9d5034d89ecb5ab6f6, under transformers 4.57.6 and torch 2.13) on tiny random models; how is
described in the fixture READMEs. Only numbers are stored.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recpre.generation import AdaptiveDepth, generate_with_info
from recpre.interop.huginn import from_huginn

FIXTURES = Path(__file__).parent / "fixtures"
ADAPTIVE = FIXTURES / "huginn-adaptive"
EXPECTED = json.loads((ADAPTIVE / "expected.json").read_text())


def reference_model(folder: Path):
    model = from_huginn(folder)
    model.config.state_init = "zero"  # the fixtures ran with init_scale=0: a zero initial state
    model.config.attention = "sdpa"  # the reference's attention call
    return model.eval()


def rule(options: dict) -> AdaptiveDepth:
    """The reference's generate_with_adaptive_compute keywords as an AdaptiveDepth."""
    return AdaptiveDepth(
        threshold=options.get("exit_threshold"),
        criterion=options["criterion"],
        min_steps=options.get("min_steps", 0) + 1,  # the reference checks from iteration min_steps + 1 on
        check_every=options.get("check_criterion_every_n_steps", 1),
        exit_in_prefill=not options.get("do_not_exit_in_prefill", False),
        freeze_exited=False,  # the reference keeps iterating stopped rows (one row here: no difference)
        cache_lookup=options.get("cache_lookup_strategy", "full"),
    )


def case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case["options"].items()) + f",prompt={case['prompt'][0]}"


@pytest.fixture(scope="module")
def adaptive_model():
    return reference_model(ADAPTIVE)


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=case_id)
def test_adaptive_exit_tokens_and_depths_equal_the_reference(adaptive_model, case):
    out = generate_with_info(
        adaptive_model,
        [case["prompt"]],
        max_new_tokens=EXPECTED["max_new_tokens"],
        num_steps=EXPECTED["num_steps"],
        eos_id=-1,
        adaptive=rule(case["options"]),
    )
    assert out.depths[0] == case["depths"]
    assert out.new_tokens[0] == case["new_tokens"]


def test_every_criterion_and_lookup_of_the_reference_is_covered():
    criteria = {c["options"]["criterion"] for c in EXPECTED["cases"]}
    lookups = {c["options"].get("cache_lookup_strategy", "full") for c in EXPECTED["cases"]}
    assert criteria == {"kl", "minp-kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability"}
    assert {"full", "skip", "latest-m4", "available-m4", "always-last-m4"} <= lookups
    assert any("compress-s" in x for x in lookups) and any("compress-r" in x for x in lookups)
    assert any("anchor" in x for x in lookups)
    assert not any("error" in c for c in EXPECTED["cases"])
    assert len({tuple(c["depths"]) for c in EXPECTED["cases"]}) > 10  # the cases do not all agree


def test_reference_defaults_are_one_option_and_recpre_defaults_differ():
    ref = AdaptiveDepth.like_reference("latent-diff")
    assert (ref.threshold, ref.exit_in_prefill, ref.freeze_exited, ref.cache_lookup) == (0.03, True, False, "full")
    ours = AdaptiveDepth(criterion="latent-diff")
    assert (ours.threshold, ours.exit_in_prefill, ours.freeze_exited, ours.cache_lookup) == (
        0.03,
        False,
        True,
        "latest-m4",
    )
    assert AdaptiveDepth().threshold == 1e-3 and AdaptiveDepth(criterion="argmax-stability").threshold == 5


def test_reference_defaults_reproduce_the_reference_run(adaptive_model):
    """`AdaptiveDepth.like_reference(criterion)` alone gives the reference's default run."""
    for case in EXPECTED["cases"]:
        if set(case["options"]) != {"criterion"}:
            continue
        out = generate_with_info(
            adaptive_model, [case["prompt"]], max_new_tokens=10, num_steps=16, eos_id=-1,
            adaptive=AdaptiveDepth.like_reference(case["options"]["criterion"]),
        )  # fmt: skip
        assert (out.new_tokens[0], out.depths[0]) == (case["new_tokens"], case["depths"])


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_bf16_autocast_forward_equals_the_reference_bit_for_bit(steps):
    model = reference_model(FIXTURES / "huginn-tiny")
    expected = load_file(FIXTURES / "huginn-tiny" / "expected-bf16.safetensors")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(expected["input_ids"], num_steps=steps).logits
    assert torch.equal(logits, expected[f"logits_bf16_steps_{steps}"])
