"""The memory planner: what each rank will hold, before a job is launched (`train.py --plan`, submit's check).

A 4096-rank job that runs out of memory after an hour in the queue wastes the queue time and the allocation, so
the plan is made from the settings alone: the model is built on the meta device (nothing is allocated), the
optimizer takes one step on meta tensors to show its state layout, and every figure is arithmetic over shapes.

Parameters, gradients and optimizer state follow the strategies' own layouts (FSDP2's padded row shards, the
ZeRO-1 chunk stream's slices, whole-tensor owners under Muon) and equal the `memory` event measured from the
tensors (recpre/memory.py). Communication buffers and activations are estimates; docs/memory-planner.md says how
they are made and how well they held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from recpre.errors import UserError

GIB = 2**30
MARGIN_FRACTION = 0.10  # allocator fragmentation and the CUDA/ROCm context, over the planned subtotal
MARGIN_MIN = 512 * 2**20
FSDP = ("fsdp", "hsdp")


@dataclass(frozen=True)
class PlanInputs:
    """The settings a plan depends on (remedies are replacements of these fields)."""

    model_name: str
    overrides: tuple[tuple[str, Any], ...]
    optim: tuple[tuple[str, Any], ...]
    strategy: str
    precision: str
    optimizer_sharding: bool
    shard_group: str
    shard_size: int | None
    chunk_mb: float
    micro_batch_size: int
    world_batch_size: int
    activation_checkpointing: bool
    fused_head: str
    backprop_depth: int | None  # the deepest backprop window a curriculum reaches (None: the shape's default)
    world_size: int
    ranks_per_node: int
    lora: tuple[tuple[str, Any], ...] = ()  # model.lora's shape (rank, targets, per_iteration); () without LoRA

    @classmethod
    def from_settings(cls, settings: Any, world_size: int, ranks_per_node: int | None = None) -> PlanInputs:
        if world_size < 1:
            raise UserError(f"--world-size must be >= 1, got {world_size}")
        f, m, t, rec = settings.fabric, settings.model, settings.train, settings.train.recurrence
        strategy = str(f.strategy)
        if strategy == "auto":
            strategy = "single" if world_size == 1 else "simple-ddp"
        depths = [d for d in (rec.backprop_depth, rec.curriculum.start_backprop_depth) if d is not None]
        optim = {k: getattr(settings.optim, k) for k in ("name", "lr", "weight_decay", "beta1", "beta2", "eps")}
        optim.update(no_decay=tuple(settings.optim.no_decay), update_clipping=settings.optim.update_clipping)
        lo = m.lora
        lora = (("per_iteration", lo.per_iteration), ("rank", lo.rank), ("targets", tuple(lo.targets)))
        return cls(
            model_name=str(m.name),
            overrides=tuple(sorted(dict(m.overrides).items())),
            optim=tuple(sorted(optim.items())),
            strategy=strategy,
            precision=str(f.precision),
            optimizer_sharding=bool(f.optimizer_sharding),
            shard_group=str(f.shard_group),
            shard_size=f.shard_size,
            chunk_mb=float(f.chunk_mb),
            micro_batch_size=int(t.micro_batch_size),
            world_batch_size=int(t.world_batch_size),
            activation_checkpointing=bool(m.activation_checkpointing),
            fused_head=str(m.fused_head),
            backprop_depth=max(depths) if depths else None,
            world_size=world_size,
            ranks_per_node=min(ranks_per_node or world_size, world_size),
            lora=lora if lo.rank else (),
        )

    @property
    def shard_size_used(self) -> int:
        """Ranks that divide the sharded state among them (the fabric's rule)."""
        if self.strategy == "fsdp":
            return self.world_size
        if self.strategy == "hsdp":
            return int(self.shard_size or self.ranks_per_node)
        if self.optimizer_sharding and self.world_size > 1:
            return self.world_size if self.shard_group == "world" else self.ranks_per_node
        return 1

    def describe(self) -> str:
        zero = " + optimizer_sharding" if self.optimizer_sharding else ""
        ckpt = ", activation checkpointing" if self.activation_checkpointing else ""
        lora = f" + LoRA rank {dict(self.lora)['rank']}" if self.lora else ""
        return (
            f"{self.model_name}{lora}, {self.strategy}{zero} on {self.world_size} ranks, {self.precision}, "
            f"micro-batch {self.micro_batch_size}{ckpt}, fused_head={self.fused_head}"
        )


@dataclass(frozen=True)
class RankPlan:
    """Bytes one rank holds at its peak."""

    rank: int
    params: int
    grads: int
    optimizer: int
    comm: int
    activations: int

    @property
    def subtotal(self) -> int:
        return self.params + self.grads + self.optimizer + self.comm + self.activations

    @property
    def margin(self) -> int:
        return max(MARGIN_MIN, int(MARGIN_FRACTION * self.subtotal))

    @property
    def total(self) -> int:
        return self.subtotal + self.margin


# -- the model and its optimizer on the meta device --------------------------------------------------------


def model_config_of(inputs: PlanInputs) -> Any:
    from recpre.config import ModelConfig

    return ModelConfig.from_name(
        inputs.model_name,
        fused_head=inputs.fused_head,
        activation_checkpointing=inputs.activation_checkpointing,
        **dict(inputs.overrides),
    )


@dataclass(frozen=True)
class _StateLayout:
    """Per trained parameter (in the optimizer's group order): its shape, element size, and its optimizer state as
    (elementwise bytes per element, fixed bytes) — an elementwise entry scales with the piece a rank keeps. A LoRA
    run trains its adapters only: its frozen base is in `all_shapes` (held) but has no gradient or state."""

    shapes: tuple[tuple[int, ...], ...]
    elem: tuple[int, ...]
    state: tuple[tuple[int, int], ...]
    muon: bool
    all_shapes: tuple[tuple[tuple[int, ...], int], ...]  # (shape, element size) of every parameter, trained or not

    @property
    def all_params_bytes(self) -> int:
        return sum(math.prod(shape) * e for shape, e in self.all_shapes)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@lru_cache(maxsize=8)
def state_layout(model_name: str, overrides: tuple, optim: tuple, precision: str, lora: tuple = ()) -> _StateLayout:
    """Build the model (with its LoRA adapters) and optimizer on meta, take one optimizer step there, and read
    what the state holds."""
    from types import SimpleNamespace

    from recpre.config import ModelConfig
    from recpre.model import build_model
    from recpre.optim import MuonAdamW, build_optimizer

    model = build_model(ModelConfig.from_name(model_name, **dict(overrides)), device="meta")
    if lora:
        from recpre.lora import apply_lora

        apply_lora(model, SimpleNamespace(**dict(lora), alpha=1.0, dropout=0.0, quantize=None), device="meta")
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    opt_settings = SimpleNamespace(**{k: list(v) if k == "no_decay" else v for k, v in optim})
    optimizer = build_optimizer(model, opt_settings)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = []
    for p in params:
        per_elem = fixed = 0
        for value in optimizer.state[p].values():
            if not torch.is_tensor(value):
                continue
            if value.dim() > 0 and value.numel() == p.numel():
                per_elem += value.element_size()
            else:
                fixed += _tensor_bytes(value)
        state.append((per_elem, fixed))
    return _StateLayout(
        shapes=tuple(tuple(p.shape) for p in params),
        elem=tuple(p.element_size() for p in params),
        state=tuple(state),
        muon=isinstance(optimizer, MuonAdamW),
        all_shapes=tuple((tuple(p.shape), p.element_size()) for p in model.parameters()),
    )


# -- parameters, gradients, optimizer state: exact -----------------------------------------------------------


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(dim-0 rows, elements per row) of a parameter as FSDP2 cuts it."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def state_bytes(inputs: PlanInputs, rank: int) -> dict[str, int]:
    """params_bytes, grads_bytes, optimizer_bytes of `rank`, as the memory event measures them."""
    lay = state_layout(*_layout_key(inputs))
    full = [math.prod(s) for s in lay.shapes]
    grads = sum(n * e for n, e in zip(full, lay.elem))
    whole_state = [n * per + fixed for n, (per, fixed) in zip(full, lay.state)]
    if inputs.strategy in FSDP:
        parts = inputs.shard_size_used
        r = rank % parts

        def padded(shape: tuple[int, ...]) -> int:  # FSDP2 keeps every rank's shard padded to ceil(rows / N) rows
            rows, row = _rows(shape)
            return -(-rows // parts) * row

        params = sum(padded(shape) * e for shape, e in lay.all_shapes)
        grads = opt = 0
        for shape, e, (per, fixed) in zip(lay.shapes, lay.elem, lay.state):
            rows, row = _rows(shape)
            chunk = -(-rows // parts)
            grads += padded(shape) * e
            opt += max(0, min(chunk, rows - r * chunk)) * row * per + fixed
        return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": opt}
    base = {"params_bytes": lay.all_params_bytes, "grads_bytes": grads}
    parts = inputs.shard_size_used
    if parts == 1:
        return {**base, "optimizer_bytes": sum(whole_state)}
    r = rank % parts
    if lay.muon:  # whole tensors, owners balanced by bytes (recpre/zero.py)
        from recpre.zero import balance_whole

        owners = balance_whole([n * e for n, e in zip(full, lay.elem)], parts)
        return {**base, "optimizer_bytes": sum(b for b, o in zip(whole_state, owners) if o == r)}
    owned = _stream(_layout_key(inputs), inputs.chunk_mb, parts).owned(r)
    opt = sum(piece.length * lay.state[piece.index][0] + lay.state[piece.index][1] for piece in owned)
    return {**base, "optimizer_bytes": opt}


@lru_cache(maxsize=8)
def _stream(layout_key: tuple, chunk_mb: float, parts: int) -> Any:
    """The ZeRO-1 chunk stream over meta parameters of the planned shapes (its buffers allocate nothing)."""
    from recpre.grad_stream import GradStream

    params = [torch.empty(s, device="meta") for s in state_layout(*layout_key).shapes]
    elements = max(1, int(chunk_mb * 2**20) // 4)
    return GradStream(params, elements, torch.device("meta"), 2, flags=False, parts=parts)


# -- communication buffers and activations: estimates -----------------------------------------------------


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def comm_bytes(inputs: PlanInputs, config: Any) -> int:
    """Collective buffers: the chunk stream's two fp32 buffers (simple-ddp), DDP's buckets (a flat fp32 copy of
    the gradients), FSDP's gathered blocks (the looped core stays gathered through its pass, two other blocks in
    flight) and one block's unsharded fp32 gradients for the reduce-scatter."""
    lay = state_layout(*_layout_key(inputs))
    total = sum(math.prod(s) for s in lay.shapes)
    if inputs.strategy == "single" or (inputs.world_size == 1 and inputs.strategy not in FSDP):
        return 0
    if inputs.strategy == "torch-ddp":
        return sum(math.prod(s) * e for s, e in zip(lay.shapes, lay.elem))
    if inputs.strategy in FSDP:
        block = config.block_params()
        gathered = _compute_bytes(inputs.precision) * block * (2 + (config.n_layers_core if config.is_recurrent else 0))
        return gathered + 4 * block
    elements = max(1, min(int(inputs.chunk_mb * 2**20) // 4, total))
    slices = 2 * elements // inputs.shard_size_used * 4 if inputs.shard_size_used > 1 else 0
    return 2 * elements * 4 + slices


def activation_bytes(inputs: PlanInputs, config: Any) -> int:
    """Saved tensors at the deepest backprop window (plus, under bf16-mixed, autocast's bf16 weight copies).

    Per block and token: the residual inputs of its two norms (fp32 under bf16-mixed), the normed inputs of the
    attention and MLP projections, q/k/v, the attention output, the gated MLP's 2I projection and its I-wide
    product. Activation checkpointing keeps each checkpointed unit's input and recomputes one unit at a time."""
    act = _compute_bytes(inputs.precision)
    res = 2 if inputs.precision == "bf16-true" else 4
    d, i_ff = config.n_embd, config.intermediate_size
    qkv = d + 2 * config.kv_heads * config.head_dim
    per_block = 2 * d * res + act * (d + qkv + d + d + 3 * i_ff)
    tokens = inputs.micro_batch_size * config.block_size
    ckpt = inputs.activation_checkpointing
    if config.is_recurrent:
        window = inputs.backprop_depth or config.mean_backprop_depth
        outer = (config.n_layers_prelude + config.n_layers_coda) * per_block
        core = config.n_layers_core * per_block + act * 2 * d  # the adapter's [state, embedding] input
        blocks = outer + (window * d * res + core if ckpt else window * core)
    else:
        blocks = config.n_layers * d * res + per_block if ckpt else config.n_layers * per_block
    vocab = config.padded_vocab_size
    if config.fused_head == "chunked":
        from recpre.ops import default_chunk_size

        head = 2 * 4 * default_chunk_size(tokens, vocab, "cuda") * vocab + 4 * vocab * d  # logits, their grad, fp32 dW
    else:
        head = tokens * vocab * (act + 4 + 4)  # logits, fp32 upcast, their gradient
    per_rank = tokens * (blocks + d * res) + head
    if inputs.precision == "bf16-mixed" and inputs.strategy not in FSDP:  # FSDP casts its gathered copies
        per_rank += 2 * sum(math.prod(s) for s, _ in state_layout(*_layout_key(inputs)).all_shapes)
    return per_rank


def _layout_key(inputs: PlanInputs) -> tuple:
    return inputs.model_name, inputs.overrides, inputs.optim, inputs.precision, inputs.lora


# -- the plan, the verdict and the remedies ------------------------------------------------------------------


def plan_ranks(inputs: PlanInputs) -> list[RankPlan]:
    """One RankPlan per distinct position in the shard group (replicas hold the same)."""
    config = model_config_of(inputs)
    comm, acts = comm_bytes(inputs, config), activation_bytes(inputs, config)
    out = []
    for rank in range(inputs.shard_size_used if inputs.shard_size_used > 1 else 1):
        s = state_bytes(inputs, rank)
        out.append(RankPlan(rank, s["params_bytes"], s["grads_bytes"], s["optimizer_bytes"], comm, acts))
    return out


def peak_total(inputs: PlanInputs) -> int:
    return max(r.total for r in plan_ranks(inputs))


def remedies(inputs: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """Changes that lower memory, cheapest in throughput first: optimizer sharding, activation checkpointing, fsdp,
    a smaller micro-batch (more accumulation); then pairs of them."""
    single: list[tuple[str, PlanInputs]] = []
    if not inputs.optimizer_sharding and inputs.strategy not in FSDP and inputs.world_size > 1:
        single.append(
            (
                "fabric.strategy=simple-ddp fabric.optimizer_sharding=true",
                replace(inputs, strategy="simple-ddp", optimizer_sharding=True),
            )
        )
    if not inputs.activation_checkpointing:
        single.append(("model.activation_checkpointing=true", replace(inputs, activation_checkpointing=True)))
    if inputs.strategy != "fsdp" and inputs.world_size > 1:
        single.append(("fabric.strategy=fsdp", replace(inputs, strategy="fsdp", optimizer_sharding=False)))
    smaller = [
        m for m in range(inputs.micro_batch_size - 1, 0, -1) if inputs.world_batch_size % (m * inputs.world_size) == 0
    ]
    if smaller:
        single.append((f"train.micro_batch_size={smaller[0]}", replace(inputs, micro_batch_size=smaller[0])))
        if smaller[-1] != smaller[0]:
            single.append((f"train.micro_batch_size={smaller[-1]}", replace(inputs, micro_batch_size=smaller[-1])))
    pairs = []
    for a in range(len(single)):
        for b in range(a + 1, len(single)):
            (ta, ia), (tb, ib) = single[a], single[b]
            if ta.split("=")[0] == tb.split("=")[0] or ("fabric.strategy" in ta and "fabric.strategy" in tb):
                continue  # two values of one key
            merged = {f: getattr(ib, f) for f in ib.__dataclass_fields__ if getattr(ib, f) != getattr(inputs, f)}
            pairs.append((f"{ta} {tb}", replace(ia, **merged)))
    return single + pairs


def fitting_remedies(inputs: PlanInputs, limit_bytes: int, keep: int = 3) -> list[tuple[str, int]]:
    """The first `keep` remedies (cheapest first) whose planned peak fits, with that peak."""
    found = []
    for text, changed in remedies(inputs):
        total = peak_total(changed)
        if total <= limit_bytes:
            found.append((text, total))
            if len(found) == keep:
                break
    return found


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def report(inputs: PlanInputs, device_gib: float | None) -> tuple[str, bool]:
    """The printed plan and whether it fits (True without a device size)."""
    ranks = plan_ranks(inputs)
    lines = [f"memory plan: {inputs.describe()}"]
    largest = max(ranks, key=lambda r: r.total)
    shown = ranks if len(ranks) <= 4 else [ranks[0]] + ([largest] if largest.rank else [])
    head = f"{'rank':>6} {'params':>12} {'grads':>12} {'optimizer':>12} {'comm':>12} {'activations':>12}"
    lines.append(head + f" {'margin':>12} {'total':>12}")
    for r in shown:
        cols = (r.params, r.grads, r.optimizer, r.comm, r.activations, r.margin, r.total)
        lines.append(f"{r.rank:>6} " + " ".join(f"{gib(c):>12}" for c in cols))
    if len(ranks) > len(shown):
        lines.append(f"(rank 0 and the largest of the {len(ranks)} ranks of a shard group; replicas hold the same)")
    peak = max(r.total for r in ranks)
    if device_gib is None:
        lines.append(f"largest rank: {gib(peak)}")
        return "\n".join(lines), True
    limit = int(device_gib * GIB)
    if peak <= limit:
        lines.append(f"fits in {device_gib:g} GiB (largest rank {gib(peak)})")
        return "\n".join(lines), True
    lines.append(f"does not fit in {device_gib:g} GiB (largest rank {gib(peak)})")
    lines.append(refusal(inputs, device_gib, peak))
    return "\n".join(lines), False


def refusal(inputs: PlanInputs, device_gib: float, peak: int | None = None) -> str:
    """One sentence: the planned peak, the device size and the cheapest remedies with their planned totals."""
    peak = peak_total(inputs) if peak is None else peak
    found = fitting_remedies(inputs, int(device_gib * GIB))
    fixes = "; ".join(f"{text} ({gib(total)})" for text, total in found)
    advice = f"set {fixes}" if found else "use more or larger devices, or a smaller model"
    return (
        f"the memory plan needs {gib(peak)} per rank but a device has {device_gib:g} GiB "
        f"({inputs.describe()}): {advice}"
    )


def check_fits(inputs: PlanInputs, device_gib: float) -> None:
    """Raise UserError with the planner's sentence when the largest rank does not fit."""
    if peak_total(inputs) > int(device_gib * GIB):
        raise UserError(refusal(inputs, device_gib))


# -- the commands: train.py --plan, the start-up check on a GPU, submit's check -----------------------------


def plan_command(settings: Any, world_size: int | None, device_gib: float | None, ranks_per_node: int | None) -> int:
    """`train.py --plan`: print the plan; exit code 0 when it fits (or no device size is given), 1 when not."""
    if world_size is None:
        raise UserError("--plan needs --world-size N (the number of ranks the job will run on)")
    if device_gib is not None and not device_gib > 0:
        raise UserError(f"--device-memory-gib must be positive, got {device_gib}")
    text, fits = report(PlanInputs.from_settings(settings, world_size, ranks_per_node), device_gib)
    print(text)
    return 0 if fits else 1


def check_device_memory(settings: Any, fabric: Any) -> None:
    """At start-up on a GPU: refuse (UserError, the planner's sentence) a run whose plan exceeds the device."""
    if fabric.device.type != "cuda" or settings.model.lora.quantize:  # QLoRA's 4-bit base is not planned
        return
    total = torch.cuda.get_device_properties(fabric.device).total_memory
    check_fits(PlanInputs.from_settings(settings, fabric.world_size, fabric.shard_size), total / GIB)
