"""FSDP2 and HSDP for the fabric: parameters, gradients and optimizer state sharded by torch's `fully_shard`.

The model is wrapped from outside, one FSDP unit per transformer block plus the root (embedding, adapter, final
norm). The fabric needs only this protocol from the model (recpre/model.py implements it):

    model.blocks()            -> the transformer blocks, each sharded as its own unit
    model.recurrent_blocks()  -> the blocks that run several times per forward (the looped core; may be empty)
    model.init_parameter(name, tensor) -> fill one full parameter tensor in place, drawing from torch's RNG
                                         (the driver may pass another, e.g. one that also knows LoRA adapters)

The looped core: a core block runs n + k times per micro-batch. Gathering it per call would multiply the
all-gathers by the depth, in forward and again in backward. Its units keep their parameters gathered after
forward (`reshard_after_forward=False`) and after each backward call (`set_reshard_after_backward(False)`), and
`reshard_looped` frees them once per step, after the last backward: one gather per unit per pass, at any depth.

Blocks receive the RoPE tables and the recurrent state inside a context object; FSDP's input casting would rebuild
it (and cast the fp32 RoPE tables to bf16), so `cast_forward_inputs=False` everywhere: autocast and the bf16
parameter copies do the casting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from recpre.optim import load_optimizer_state

InitParameter = Callable[[str, torch.Tensor], None]  # fills the full tensor of the named parameter in place


def build_mesh(device_type: str, world_size: int, shard_size: int) -> DeviceMesh:
    """1-D mesh (fsdp: shard over all ranks) or 2-D (hsdp: replicate across groups of `shard_size` ranks)."""
    if shard_size >= world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16-mixed: bf16 parameters for compute, fp32 gradient reduction; fp32 master weights stay sharded."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    precision: str,
    offload: bool,
    device: torch.device,
    init_parameter: InitParameter | None = None,
) -> nn.Module:
    """Shard `model` in place; a model built on the meta device is materialised shard by shard and initialised
    with the weights a non-sharded build draws from the same RNG state (`init_parameter`, default the model's)."""
    on_meta = any(p.is_meta for p in model.parameters())
    wrap(model, mesh, precision=precision, offload=offload)
    if on_meta:
        init = init_parameter or model.init_parameter
        materialise(model, device=torch.device("cpu") if offload else device, init_parameter=init)
    return model


def wrap(model: nn.Module, mesh: DeviceMesh, *, precision: str, offload: bool) -> nn.Module:
    """fully_shard per block (the looped core kept gathered through its pass) and the root; allocates nothing
    for a meta-device model."""
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    common: dict[str, Any] = dict(mesh=mesh, mp_policy=precision_policy(precision))
    common["offload_policy"] = CPUOffloadPolicy() if offload else OffloadPolicy()
    looped = {id(b) for b in model.recurrent_blocks()}
    for block in model.blocks():
        fully_shard(block, reshard_after_forward=id(block) not in looped, **common)
    fully_shard(model, **common)
    for block in model.recurrent_blocks():
        block.set_reshard_after_backward(False)
    return model


def materialise(model: nn.Module, device: torch.device, init_parameter: InitParameter) -> None:
    """Allocate this rank's shards, then draw each full parameter on the CPU (one at a time, in named_parameters
    order, so the RNG stream is the unsharded build's) and keep this rank's part of it."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = torch.empty(param.shape, dtype=torch.float32)
            init_parameter(name, full)
            copy_into_shard(param, full)


def copy_into_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's part of the full tensor `full` into the (DTensor) parameter or state `param`."""
    if not isinstance(param, DTensor):
        param.data.copy_(full)
        return
    local = param.to_local()
    part = distribute_tensor(
        full.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )
    local.copy_(part.to_local())


def reshard_looped(model: nn.Module) -> None:
    """Free the gathered parameters of the looped core (once per step, after the last backward)."""
    for block in model.recurrent_blocks():
        block.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP's no_sync: with `enabled` False, gradients accumulate unreduced until a micro-step with it True."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global norm of DTensor gradients (all shards, all ranks), then the clip, as clip_grad_norm_ does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


def _full(value: Any, keep: bool) -> Any:
    if isinstance(value, DTensor):
        value = value.full_tensor()
        return value.detach().cpu() if keep else None
    return value.detach().cpu() if torch.is_tensor(value) else value


def full_model_state(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Full weights on rank 0 (empty elsewhere), gathered one tensor at a time. Collective."""
    out = {}
    for name, value in model.state_dict().items():
        full = _full(value, is_main)
        if is_main:
            out[name] = full
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, is_main: bool) -> dict[str, Any] | None:
    """The index-keyed state a single process saves, on rank 0 (None elsewhere). Collective."""
    saved = optimizer.state_dict()
    state = {}
    for idx in sorted(saved["state"]):
        state[idx] = {k: _full(v, is_main) for k, v in sorted(saved["state"][idx].items())}
    return {"state": state, "param_groups": saved["param_groups"]} if is_main else None


def load_model_state(model: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors (read lazily, one at a time) into this rank's shards; names must match exactly (with
    `strict` False, parameters `full` lacks keep their values)."""
    params, names = dict(model.named_parameters()), set(full.keys())
    missing = sorted(set(params) - names) if strict else []
    unexpected = sorted(names - set(params))
    if missing or unexpected:
        raise KeyError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            if name not in names:
                continue
            value = full[name]
            if tuple(value.shape) != tuple(param.shape):
                raise KeyError(f"{name} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            copy_into_shard(param, value.to(torch.float32))


def load_optimizer_full_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, source: str) -> None:
    """Shard a single-process optimizer state like the parameters it belongs to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in saved["state"].items():
        p = params[int(idx)]
        state[idx] = {}
        for key, value in entry.items():
            if isinstance(p, DTensor) and torch.is_tensor(value) and tuple(value.shape) == tuple(p.shape):
                full = value.to(p.device_mesh.device_type)
                value = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            state[idx][key] = value
    load_optimizer_state(optimizer, {"state": state, "param_groups": saved["param_groups"]}, source=source)
