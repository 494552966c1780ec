"""Optimizers: parameter groups, the ELLISAdam rule, training progress and exact resume."""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from recpre.errors import UserError
from recpre.optim import ELLISAdam, MuonAdamW, build_optimizer, param_groups

NAMES = ["adamw", "ellis-adam", "muon"]


def settings(name="adamw", **kw):
    base = dict(
        name=name,
        lr=3e-3,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        no_decay=["norm", "bias", "embedding"],
        update_clipping=True,
        muon_lr=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.wte(ids)
        x = x + self.proj(torch.relu(self.fc(x)))
        logits = self.lm_head(self.norm(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def batch(seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 16), generator=g)
    return ids, (ids * 7 + 3) % vocab  # a learnable mapping


def test_param_groups_split_by_kind():
    torch.manual_seed(0)
    model = TinyLM()
    groups = {g["group"]: g for g in param_groups(model, 0.1, ["norm", "bias", "embedding"], split_muon=True)}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert ids["muon_decay"] == {id(model.fc.weight), id(model.proj.weight)}
    assert ids["no_decay"] == {id(p) for p in (model.wte.weight, model.fc.bias, model.norm.weight, model.norm.bias)}
    assert ids["decay"] == {id(model.lm_head.weight)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    # configurable: nothing excluded -> everything decays; a substring pattern works too
    assert [g["group"] for g in param_groups(model, 0.1, [])] == ["decay"]
    sub = param_groups(model, 0.1, ["fc."])
    assert {id(p) for g in sub if g["group"] == "no_decay" for p in g["params"]} == {
        id(model.fc.weight),
        id(model.fc.bias),
    }


def test_unknown_name_is_user_error():
    with pytest.raises(UserError, match="optim.name"):
        build_optimizer(TinyLM(), settings("sgd"))


def test_groups_carry_initial_lr():
    for name in NAMES:
        opt = build_optimizer(TinyLM(), settings(name, lr=1e-3, muon_lr=0.02))
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
        if name == "muon":
            assert isinstance(opt, MuonAdamW)
            assert {g["lr"] for g in opt.param_groups if g["muon"]} == {0.02}
            assert {g["lr"] for g in opt.param_groups if not g["muon"]} == {1e-3}


@pytest.mark.parametrize("clipping", [True, False])
def test_ellis_adam_first_step_at_most_lr(clipping):
    torch.manual_seed(0)
    lr = 0.1
    p = nn.Parameter(torch.randn(1000))
    before = p.detach().clone()
    opt = ELLISAdam([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0, update_clipping=clipping)
    p.grad = torch.randn(1000) * torch.logspace(-8, 4, 1000)
    p.grad[::7] = 0.0
    opt.step()
    delta = (p.detach() - before).abs()
    assert delta.max() <= lr * (1 + 1e-6), f"first step moved {delta.max() / lr:.3f} x lr"
    assert delta.max() > 0.5 * lr  # and it does move
    assert (delta[::7] == 0).all()


def reference_ellis(params, grad_seq, lrs, lr0, b1, b2, eps, wd, clipping):
    """The documented rule, element by element in float64, one tensor at a time."""
    params = [p.clone().double() for p in params]
    m = [None] * len(params)
    v = [None] * len(params)
    for grads, lr in zip(grad_seq, lrs):
        for i, g in enumerate(grads):
            g = g.double()
            if m[i] is None:
                m[i], v[i] = g.clone(), g * g
            else:
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
            u = torch.atan2(m[i], v[i].sqrt())
            if clipping:
                rms = (g / (v[i].sqrt() + eps)).pow(2).mean().sqrt()
                u = u / max(1.0, float(rms))
            params[i] = params[i] * (1 - (lr / lr0) * wd) - lr * u
    return params, m, v


@pytest.mark.parametrize("clipping", [True, False])
def test_ellis_adam_matches_float64_reference(clipping):
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 7), (13,), (2, 3, 4)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    steps = 20
    grad_seq = [[torch.randn(s, generator=g, dtype=torch.float64) * (1 + 3 * t) for s in shapes] for t in range(steps)]
    lr0, wd, b1, b2, eps = 0.05, 0.01, 0.8, 0.9, 1e-8
    lrs = [lr0 * min(1.0, (t + 1) / 5) * (1 - 0.5 * t / steps) for t in range(steps)]  # warmup + decay schedule
    params = [nn.Parameter(p.clone()) for p in init]
    opt = ELLISAdam(params, lr=lr0, betas=(b1, b2), eps=eps, weight_decay=wd, update_clipping=clipping)
    for grads, lr in zip(grad_seq, lrs):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    want, want_m, want_v = reference_ellis(init, grad_seq, lrs, lr0, b1, b2, eps, wd, clipping)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=1e-12)
    # the state holds the running moments of the raw gradients, untouched by clipping or weight decay
    for p, m, v in zip(params, want_m, want_v):
        assert opt.state[p]["step"] == steps
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, atol=1e-12, rtol=1e-12)


def train(model, opt, steps, seed=0, loss_fn=None):
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, i) if loss_fn else model(*batch(seed))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_tiny(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, settings(name, lr=1e-2, weight_decay=1e-4 if name == "ellis-adam" else 0.01))
    losses = train(model, opt, 40)
    assert losses[-1] < 0.5 * losses[0], losses


def _debug_model():
    from recpre.config import ModelConfig
    from recpre.model import build_model

    torch.manual_seed(0)
    config = ModelConfig.from_name("debug-recurrent")
    return build_model(config), config


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_debug_model(name):
    model, config = _debug_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=g)

    def loss_fn(m, i):
        return m(ids[:, :-1], labels=ids[:, 1:], num_steps=(0, 2)).loss

    opt = build_optimizer(model, settings(name, lr=3e-3, weight_decay=1e-4 if name == "ellis-adam" else 0.01))
    losses = train(model, opt, 12, loss_fn=loss_fn)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(name):
    torch.manual_seed(0)
    model = TinyLM()
    cfg = settings(name, lr=5e-3, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    train(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)

    def schedule(o, step):
        for g in o.param_groups:
            g["lr"] = g["initial_lr"] * (1 - 0.05 * step)

    def continue_(m, o):
        for step in range(5, 10):
            schedule(o, step)
            train(m, o, 1, seed=step)
        return [p.detach().clone() for p in m.parameters()]

    expected = continue_(model, opt)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    model2 = TinyLM()
    model2.load_state_dict(saved["model"])
    opt2 = build_optimizer(model2, cfg)
    opt2.load_state_dict(saved["optim"])
    got = continue_(model2, opt2)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_lr_set_on_groups_reaches_every_parameter(name):
    """After a reload, lr=0 on the visible groups must freeze all parameters (Muon's inner optimizers too)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, settings(name, weight_decay=0.1))
    train(model, opt, 2)
    opt2 = build_optimizer(model, settings(name, weight_decay=0.1))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in opt2.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt2, 1)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)


def test_ellis_weight_decay_follows_schedule():
    p = nn.Parameter(torch.ones(4))
    opt = ELLISAdam([p], lr=0.1, weight_decay=0.01)
    opt.param_groups[0]["lr"] = 0.05  # half the base lr -> half the decay
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.005), atol=0, rtol=1e-7)
    assert math.isclose(opt.param_groups[0]["initial_lr"], 0.1)


def newton_schulz_float64(u: torch.Tensor, steps=5, coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7):
    """Muon's quintic Newton-Schulz orthogonalization (Keller Jordan's coefficients), in float64."""
    a, b, c = coefficients
    x = u.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp_min(eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_muon_steps(grads, lrs, shape, momentum=0.95):
    """The documented rule in float64, as (decay factor per wd, update) per step: B <- mu B + (1 - mu) g;
    Nesterov u = (1 - mu) g + mu B; p <- p (1 - lr wd) - lr 0.2 sqrt(max(A, B)) NS(u) ("match_rms_adamw")."""
    buf, steps = torch.zeros(shape, dtype=torch.float64), []
    for g, lr in zip(grads, lrs):
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf
        steps.append((lr, lr * 0.2 * math.sqrt(max(shape)) * newton_schulz_float64(u)))
    return steps


def test_muon_update_matches_a_float64_reference():
    """Muon orthogonalizes in bfloat16, so the match is to ~2% of a step; a wrong rule (no Nesterov, the
    'original' lr adjustment, no weight decay) misses by 10-40%."""
    torch.manual_seed(0)
    model = TinyLM()
    lr, wd = 0.02, 1.0
    opt = build_optimizer(model, settings("muon", lr=lr, weight_decay=wd, muon_lr=lr))
    matrices = {"fc": model.fc.weight, "proj": model.proj.weight}  # 64 x 32 and 32 x 64
    start = {k: w.detach().clone() for k, w in matrices.items()}
    g = torch.Generator().manual_seed(3)
    grads = {k: [torch.randn(w.shape, generator=g) for _ in range(4)] for k, w in matrices.items()}
    lrs = [lr, lr / 2, lr / 4, lr]
    seen = {k: [] for k in matrices}
    for t, step_lr in enumerate(lrs):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for k, w in matrices.items():
            w.grad = grads[k][t].clone()
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.step()
        for k, w in matrices.items():
            seen[k].append(w.detach().double().clone())
    for k in matrices:
        for t, (step_lr, update) in enumerate(reference_muon_steps(grads[k], lrs, start[k].shape)):
            before = start[k].double() if t == 0 else seen[k][t - 1]
            want = before * (1 - step_lr * wd) - update
            assert (seen[k][t] - want).abs().max() < 0.04 * (want - before).abs().max(), (k, t)


def test_weight_decay_is_decoupled_for_muon_and_adamw_groups():
    """A step with zero gradients only decays: p <- p (1 - lr wd) in the decay groups (Muon's matrices and AdamW's),
    exactly, and leaves the no-decay parameters (embedding, norms, biases) untouched."""
    torch.manual_seed(0)
    model = TinyLM()
    lr, wd = 0.01, 0.3
    opt = build_optimizer(model, settings("muon", lr=lr, weight_decay=wd, muon_lr=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = groups[id(p)]
        if group["weight_decay"] == 0.0:
            assert name in ("wte.weight", "fc.bias", "norm.weight", "norm.bias")
            assert torch.equal(p.detach(), before[name]), name
        else:
            factor = 1 - group["lr"] * wd  # Muon's own lr for its matrices, AdamW's for the head
            torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0)
    assert {g["lr"] for g in opt.param_groups if g["muon"]} == {0.05}
