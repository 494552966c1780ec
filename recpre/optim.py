"""Optimizer construction: parameter groups, AdamW, ELLISAdam and Muon (with AdamW for non-matrix params).

Every group carries `initial_lr` (its base learning rate) beside `lr`. The driver's schedule sets
`group["lr"] = group["initial_lr"] * factor(step)` for every group; that is how Muon's own base lr and
AdamW's base lr follow one schedule. Every optimizer here is a single `torch.optim.Optimizer` whose
state_dict holds only tensors, numbers, strings, lists and dicts, so it loads with weights_only=True.

Groups: parameters named by `no_decay` get weight_decay 0. Kinds: "norm" (parameters of modules whose class
name contains "Norm", or whose name contains "norm"), "bias" (names ending in "bias", e.g. qk_bias),
"embedding" (nn.Embedding parameters, and so a tied LM head; an untied head decays); any other string is a substring of the
parameter's qualified name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recpre.errors import UserError
from recpre.settings_schema import OPTIMIZERS as NAMES
from recpre.settings_schema import OptimSettings
from recpre.unwrap import plain_parameter_name

# parameter names (last component of the owning module) that are the LM head / embeddings, not hidden matrices
HEAD_NAMES = ("lm_head", "head", "output", "wte", "embed_tokens", "tok_embeddings", "embedding", "embeddings")


def _get(settings: Any, key: str) -> Any:
    """settings.key, or the default `OptimSettings` gives it: one source for every optimizer default."""
    value = getattr(settings, key, None)
    return getattr(OptimSettings(), key) if value is None else value


def _classify(model: nn.Module) -> list[tuple[str, nn.Parameter, bool, bool, bool]]:
    """(name, param, is_embedding, is_head, is_norm) for each trainable parameter, shared ones once."""
    embedding_ids: set[int] = set()
    norm_ids: set[int] = set()
    head_ids: set[int] = set()
    for mod_name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if isinstance(mod, nn.Embedding):
            embedding_ids.update(id(p) for p in own)
        if "norm" in type(mod).__name__.lower():
            norm_ids.update(id(p) for p in own)
        if mod_name.split(".")[-1] in HEAD_NAMES:
            head_ids.update(id(p) for p in own)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = plain_parameter_name(name)  # a LoRA-wrapped layer's weight is matched by its own name
        out.append((name, p, id(p) in embedding_ids, id(p) in head_ids, id(p) in norm_ids))
    return out


def _no_decay(name: str, is_emb: bool, is_norm: bool, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat == "norm" and (is_norm or "norm" in name.lower()):
            return True
        if pat == "bias" and name.split(".")[-1].endswith("bias"):
            return True
        if pat == "embedding" and is_emb:
            return True
        if pat not in ("norm", "bias", "embedding") and pat in name:
            return True
    return False


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: list[str], split_muon: bool = False
) -> list[dict[str, Any]]:
    """Groups tagged with "group" = decay / no_decay, plus muon_decay / muon_no_decay for 2-D hidden matrices
    (not embeddings, not the LM head: modules named in HEAD_NAMES) when split_muon."""
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p, is_emb, is_head, is_norm in _classify(model):
        key = "no_decay" if _no_decay(name, is_emb, is_norm, no_decay) else "decay"
        if split_muon and p.dim() == 2 and not (is_emb or is_head):
            key = "muon_" + key
        buckets.setdefault(key, []).append(p)
    order = ("muon_decay", "muon_no_decay", "decay", "no_decay")
    return [
        {
            "params": buckets[k],
            "weight_decay": 0.0 if k.endswith("no_decay") else weight_decay,
            "group": k,
        }
        for k in order
        if buckets.get(k)
    ]


class ELLISAdam(torch.optim.Optimizer):
    """Adam-atan2 with running init and update clipping, as used for Huginn, with its defects fixed.

    Per element, step t (t = 1 is the first step this parameter has a gradient):
        t = 1:  m = g, v = g^2                    (running init; no bias correction at any step)
        t > 1:  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
        u = atan2(m, sqrt(v))                     (|u| < pi/2; at t = 1 exactly pi/4 * sign(g) or 0)
        update clipping: u = u / max(1, rms(g / (sqrt(v) + eps)))   per tensor
        p = p * (1 - (lr / initial_lr) * weight_decay) - lr * u
    So the first step moves each element by at most (pi/4) lr. Weight decay follows the reference: a per-step
    fraction at the base lr, scaled by the schedule (not multiplied by lr as in AdamW): use values ~1e-4-1e-3.
    State m, v are only written by lerp/mul/addcmul (never clamped in place); the step has no host sync.
    """

    # Set by optimizer sharding (recpre/zero.py) when the parameters are pieces of tensors split over ranks:
    # (group, pieces, piece norms) -> (whole-tensor norms, whole-tensor sizes); a collective.
    shard_norms = None

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_clipping: bool = True,
    ) -> None:
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid lr {lr} or betas {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, update_clipping=update_clipping)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            wd_factor = 1.0 - (lr / group["initial_lr"]) * group["weight_decay"]
            fresh_p, fresh_g, old_p, old_g, old_m, old_v = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ELLISAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 1
                    state["exp_avg"] = p.grad.detach().clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = p.grad.detach() * p.grad.detach()
                    fresh_p.append(p)
                    fresh_g.append(p.grad)
                else:
                    state["step"] += 1
                    old_p.append(p)
                    old_g.append(p.grad)
                    old_m.append(state["exp_avg"])
                    old_v.append(state["exp_avg_sq"])
            if old_p:
                torch._foreach_lerp_(old_m, old_g, 1.0 - b1)
                torch._foreach_mul_(old_v, b2)
                torch._foreach_addcmul_(old_v, old_g, old_g, value=1.0 - b2)
            params = fresh_p + old_p
            if not params:
                if self.shard_norms is not None and group["update_clipping"]:
                    self.shard_norms(group, [], [])  # a collective: a rank without pieces here takes part too
                continue
            grads = fresh_g + old_g
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            roots = torch._foreach_sqrt(vs)
            updates = [torch.atan2(m, r) for m, r in zip(ms, roots)]
            if group["update_clipping"]:
                torch._foreach_add_(roots, eps)
                ratios = torch._foreach_div(grads, roots)
                norms = torch._foreach_norm(ratios)
                sizes = [p.numel() for p in params]
                if self.shard_norms is not None:  # pieces of tensors split over ranks: the whole tensors' norms
                    norms, sizes = self.shard_norms(group, params, norms)
                for u, nrm, size in zip(updates, norms, sizes):
                    # rms = norm / sqrt(numel); divide by max(1, rms) on device, no .item()
                    u.div_((nrm / math.sqrt(max(size, 1))).clamp_min(1.0))
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(params, wd_factor)
            torch._foreach_add_(params, updates, alpha=-lr)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for 2-D hidden matrices and AdamW for everything else, as one optimizer.

    The driver sees one `param_groups` list (Muon's groups first, each tagged "muon": True/False, with its
    own `initial_lr`) and one state_dict. The inner optimizers share this object's group dicts and state, so
    setting group["lr"] reaches them; load_state_dict re-links them to the restored groups.
    """

    def __init__(self, muon_groups: list[dict], adam_groups: list[dict], *, muon_kwargs: dict, adam_kwargs: dict):
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            raise UserError("optim.name=muon needs torch.optim.Muon (torch >= 2.9); choose optim.name=adamw")
        inner_m = muon_cls(muon_groups, **muon_kwargs) if muon_groups else None
        inner_a = torch.optim.AdamW(adam_groups, **adam_kwargs) if adam_groups else None
        groups = []
        for inner, flag in ((inner_m, True), (inner_a, False)):
            if inner is not None:
                for g in inner.param_groups:
                    g["muon"] = flag
                    g.setdefault("initial_lr", g["lr"])
                    groups.append(g)
        self._inner = [(inner_m, True), (inner_a, False)]
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        for inner, flag in self._inner:
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["muon"] == flag]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner, _ in self._inner:
            if inner is not None:
                inner.step()
        return loss


def _adamw_kwargs(params: list[Tensor], lr: float, betas, eps: float) -> dict:
    kw: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps)
    devices = {p.device.type for p in params}
    if devices and devices <= {"cuda", "cpu", "mps", "xpu"} and all(p.is_floating_point() for p in params):
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return kw


def build_optimizer(model: nn.Module, settings: Any) -> torch.optim.Optimizer:
    """Optimizer named by settings.name ("adamw", "ellis-adam", "muon") over `model`'s trainable parameters.

    `settings` is any object with attributes name, lr, weight_decay, beta1, beta2, eps, no_decay,
    update_clipping, muon_lr (missing ones take the defaults below). Muon uses lr=muon_lr (default: lr) with
    adjust_lr_fn="match_rms_adamw", so AdamW's learning rate and weight decay carry over, momentum 0.95.
    """
    name = str(_get(settings, "name")).lower()
    lr = float(_get(settings, "lr"))
    wd = float(_get(settings, "weight_decay"))
    betas = (float(_get(settings, "beta1")), float(_get(settings, "beta2")))
    eps = float(_get(settings, "eps"))
    no_decay = list(_get(settings, "no_decay"))
    if name not in NAMES:
        raise UserError(f"optim.name must be one of {', '.join(NAMES)}, not {name!r}")
    if lr <= 0:
        raise UserError(f"optim.lr must be positive, got {lr}")
    groups = param_groups(model, wd, no_decay, split_muon=name == "muon")
    if not groups:
        raise UserError("the model has no trainable parameters to optimize")
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, **_adamw_kwargs(params, lr, betas, eps))
    elif name == "ellis-adam":
        opt = ELLISAdam(groups, lr=lr, betas=betas, eps=eps, update_clipping=bool(_get(settings, "update_clipping")))
    else:
        muon_lr = float(getattr(settings, "muon_lr", None) or lr)
        muon_groups = [g for g in groups if g["group"].startswith("muon_")]
        adam_groups = [g for g in groups if not g["group"].startswith("muon_")]
        adam_params = [p for g in adam_groups for p in g["params"]]
        opt = MuonAdamW(
            muon_groups,
            adam_groups,
            muon_kwargs=dict(lr=muon_lr, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
            adam_kwargs=_adamw_kwargs(adam_params, lr, betas, eps),
        )
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


__all__ = ["build_optimizer", "ELLISAdam", "MuonAdamW", "param_groups", "NAMES"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, *, source: str) -> None:
    """Take a saved optimizer's moment buffers but keep this run's hyperparameters.

    torch's `load_state_dict` also restores every group's lr, initial_lr, weight_decay and betas, so a resumed
    run that lowered `optim.lr` (the usual cure for a divergence) would go on at the old rate.
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as err:
        raise UserError(
            f"the optimizer state in {source} does not fit this run's optimizer ({err}); resume with the "
            "optim.name and optim.no_decay it was saved with, or start a new run with run.init_from"
        ) from err
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
