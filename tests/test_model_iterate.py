"""RecurrentGPT.iterate: the one recurrence, its per-iteration hook, the last-position head and the boundary hook."""

import torch

from recpre.config import ModelConfig
from recpre.model import Iteration, build_model


def tiny(**overrides):
    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent", n_embd=32, n_heads=4, intermediate_size=64, vocab_size=60,
                                   padding_multiple=16, block_size=32, state_init="zero", **overrides)  # fmt: skip
    return build_model(config)


def test_recurrence_boundary_runs_after_s0_and_each_no_grad_iteration_only():
    model = tiny()
    seen = []
    model.set_recurrence_boundary(lambda s: seen.append((s.requires_grad, tuple(s.shape))))
    ids = torch.randint(0, 60, (2, 8))
    model(ids, ids, num_steps=(3, 2)).loss.backward()
    assert len(seen) == 1 + 3  # s0, then after each of the 3 no-grad iterations; never inside the 2 with grad
    assert not any(requires_grad for requires_grad, _ in seen)
    model.set_recurrence_boundary(None)
    seen.clear()
    model(ids, num_steps=(3, 2))
    assert seen == []
    assert hasattr(build_model(ModelConfig.from_name("debug-gpt")), "set_recurrence_boundary")  # a no-op there


def test_hook_sees_every_iteration_can_replace_the_state_and_stop():
    model = tiny().eval()
    ids = torch.randint(0, 60, (2, 8))
    calls: list[int] = []

    def hook(it: Iteration) -> None:
        calls.append(it.step)
        assert it.readout(it.state).shape == (2, model.config.padded_vocab_size)
        if it.step == 2:
            it.stop = True

    with torch.no_grad():
        stopped = model.iterate(ids, num_steps=6, on_step=hook)
        three = model(ids, num_steps=3)
    assert calls == [0, 1, 2]
    assert torch.equal(stopped.logits, three.logits)  # stopping after iteration 3 == running 3 iterations

    def freeze(it: Iteration) -> None:  # every iteration undone: the result of 0 iterations
        it.state = it.previous

    with torch.no_grad():
        frozen = model.iterate(ids, num_steps=4, on_step=freeze)
        zero = model(ids, num_steps=0)
    assert torch.equal(frozen.logits, zero.logits)


def test_readout_and_last_position_head_equal_the_full_forward():
    model = tiny().eval()
    ids = torch.randint(0, 60, (2, 8))
    readouts = []
    with torch.no_grad():
        full = model(ids, num_steps=4).logits
        last = model(
            ids, num_steps=4, last_position_only=True, on_step=lambda it: readouts.append(it.readout(it.state))
        )
        gpt = build_model(ModelConfig.from_name("debug-gpt", vocab_size=60, padding_multiple=16, block_size=32))
        gpt_full, gpt_last = gpt(ids).logits, gpt(ids, last_position_only=True).logits
    assert last.logits.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last.logits[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(readouts[-1], full[:, -1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpt_last[:, 0], gpt_full[:, -1], rtol=1e-6, atol=1e-6)
