"""PyTorch/XLA (Trainium through torch-neuronx, TPU, XLA on CPU): what the training loop needs to stay graph-stable.

On XLA every distinct traced graph is a compile (minutes on Neuron). Three things keep their number fixed:

- a graph cut (`torch_xla.sync()`) after the prelude and after every no-grad recurrence iteration, so a sampled
  depth n runs the same one-iteration graph n times instead of unrolling n iterations into a new graph;
- a fixed number k of iterations with gradient (`stable_depth`), and loop indices passed as device tensors
  (`step_tensor`) where the computation reads them;
- no host reads inside a step: clipping and the skip of a non-finite step are done on the device by masking
  (`masked_optimizer_step`), and the loss / gradient norm are read after the step's graph is cut (train.py);
- `prepare_training` creates Adam's state and settles the weights before step 1, so the first step already
  runs the steady-state graphs.

`compile-sweep` (`sweep_depth`, `SWEEP_STEPS`) visits every graph a run needs in a few steps, for
`neuron_parallel_compile`. torch_xla is imported lazily: this module imports, and its pure functions work,
without it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from recpre.errors import UserError

__all__ = [
    "SWEEP_STEPS",
    "accelerator_present",
    "all_reduce_gradients",
    "available",
    "compile_count",
    "cpu_module",
    "cut",
    "device",
    "gradient_buckets",
    "init_process_group",
    "is_xla",
    "load_through_cpu",
    "masked_optimizer_step",
    "prepare_training",
    "require",
    "rewind_step_counters",
    "run_recurrence",
    "stable_depth",
    "step_tensor",
    "sweep_depth",
    "seed_device",
    "sweep_overrides",
    "training_depth",
    "sync",
    "to_cpu",
]

INSTALL_HINT = (
    "torch_xla is not installed: on Trainium install the Neuron SDK set (requirements/neuron-sdk-2.29.txt, "
    "docs/trainium.md); for XLA on CPU run scripts/make_xla_env.sh and use its .venv-xla"
)
# Optimizer steps of a compile sweep: step 1 (which creates the state of optimizers other than Adam/AdamW), then
# the steady state; the micro-steps visit n = 0, 1, 2 no-grad iterations (see sweep_depth).
SWEEP_STEPS = 3


# ---------------------------------------------------------------------------------------------- presence


def available() -> bool:
    """Whether torch_xla can be imported (without importing it: that starts the runtime)."""
    return importlib.util.find_spec("torch_xla") is not None


def accelerator_present(env: Mapping[str, str] | None = None) -> bool:
    """Whether `fabric.strategy: auto` should pick XLA: torch_xla importable and a Neuron or TPU device present.

    XLA on CPU (PJRT_DEVICE=CPU) is never auto-selected: it is a test vehicle, chosen with fabric.strategy=xla.
    """
    env = os.environ if env is None else env
    if not available():
        return False
    pjrt = str(env.get("PJRT_DEVICE", "")).upper()
    if pjrt in ("NEURON", "TPU"):
        return True
    if pjrt:  # CPU, CUDA, ...: the user chose another PJRT device
        return False
    return bool(glob.glob("/dev/neuron*")) or bool(glob.glob("/dev/accel*") and env.get("TPU_NAME") is not None)


def require() -> Any:
    """The torch_xla module, or a UserError saying how to get it."""
    try:
        import torch_xla
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return torch_xla


def device() -> torch.device:
    return require().device()


def is_xla(obj: Tensor | torch.device | None) -> bool:
    if obj is None:
        return False
    dev = obj.device if isinstance(obj, Tensor) else torch.device(obj)
    return dev.type == "xla"


def sync(wait: bool = False) -> None:
    """Cut the lazy graph here and launch it; `wait` also blocks until the device has finished (timing)."""
    torch_xla = require()
    torch_xla.sync()
    if wait:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()


def cut(tensor: Tensor) -> None:
    """A graph cut when `tensor` lives on XLA (a no-op elsewhere): called by the model between recurrence steps."""
    if tensor.device.type == "xla":
        import torch_xla

        torch_xla.sync()


# ---------------------------------------------------------------------------------------------- metrics


def _metric_count(name: str) -> int:
    if not available():
        return 0
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return 0 if data is None else int(data[0])


def compile_count() -> int:
    """Graphs compiled so far by this process (0 before the first compile, or without torch_xla)."""
    return _metric_count("CompileTime")


# ---------------------------------------------------------------------------------------------- recurrence


def stable_depth(n: int, k: int, k_fixed: int) -> tuple[int, int]:
    """(n, k) with exactly `k_fixed` grad iterations, keeping the total depth r = n + k where it allows.

    A draw with fewer than k_fixed iterations in all (r < k_fixed) is raised to r = k_fixed, so every training
    graph backpropagates through the same k_fixed iterations: a different k is a different compiled graph.
    """
    if n < 0 or k < 0 or k_fixed < 0:
        raise ValueError(f"depths must be non-negative, got n={n}, k={k}, k_fixed={k_fixed}")
    return max(n + k - k_fixed, 0), k_fixed


def training_depth(spec: Any, n: int, k: int) -> tuple[int, int]:
    """The depth a training micro-step runs on XLA: `stable_depth` with k = spec.mean_backprop_depth for the
    sampling scheme whose k varies (poisson-lognormal-filling draws k = min(s, r)); other schemes already have a
    fixed k and are returned unchanged. `spec` is the step's `recpre.recurrence.DepthSpec`: a backprop-depth
    curriculum is one set of graphs per backprop depth it passes through."""
    if spec.sampling_scheme != "poisson-lognormal-filling":
        return n, k
    return stable_depth(n, k, int(spec.mean_backprop_depth))


def seed_device(seed: int) -> None:
    """Seed the XLA device's generator (the initial-state noise is drawn there); the seed is uploaded as data,
    so a new seed per micro-batch is not a new graph."""
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(int(seed) % (2**63))


_STEP_TENSORS: dict[tuple[str, int], Tensor] = {}


def step_tensor(step: int, device: torch.device | str) -> Tensor:
    """The loop index as a 1-element int64 device tensor, so a graph that reads it is traced once for all values.

    A Python int used in arithmetic is baked into the XLA graph as a constant: n iterations would compile n
    graphs. The value is uploaded as data instead (a tiny host-to-device copy, no compile). It stays a vector of
    one element: a 0-dim upload of 0 or 1 becomes a graph constant (XLA's special scalars), and a view to 0-dim
    is an extra graph output the first time each index is used.
    """
    dev = torch.device(device)
    key = (str(dev), int(step))
    t = _STEP_TENSORS.get(key)
    if t is None:
        t = torch.tensor([int(step)], dtype=torch.int64).to(dev)
        if len(_STEP_TENSORS) < 4096:
            _STEP_TENSORS[key] = t
    return t


def run_recurrence(
    step_fn: Callable[[Tensor, Tensor], Tensor], state: Tensor, n: int, k: int, *, step_index: str = "tensor"
) -> Tensor:
    """state <- step_fn(state, i) for n iterations without gradient (a graph cut after each), then k with.

    `step_fn(state, i)` gets i as a device tensor (`step_index="tensor"`, graph-stable) or a Python int
    (`"int"`: a new graph per index on XLA; kept to show the difference in tests). The model's own loop does the
    same with its blocks; this is the reusable form.
    """
    if step_index not in ("tensor", "int"):
        raise ValueError(f"step_index must be 'tensor' or 'int', got {step_index!r}")

    def index(i: int) -> Tensor | int:
        return step_tensor(i, state.device) if step_index == "tensor" else i

    cut(state)
    with torch.no_grad():
        for i in range(n):
            state = step_fn(state, index(i))
            cut(state)
    for i in range(n, n + k):
        state = step_fn(state, index(i))
    return state


# ---------------------------------------------------------------------------------------------- the step


def _state_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> list[tuple[dict, str, Tensor]]:
    out = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.device == device:
                out.append((state, key, value))
    return out


@torch.no_grad()
def masked_optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip, step and, where the gradient norm is not finite, keep parameters and optimizer state unchanged,
    all on the device without a host read. Returns the (pre-clip) global gradient norm as a device scalar.

    The skip is a `torch.where` over the old and new values inside the same graph (no branch on a device value,
    which would force a host sync and split the graph). Optimizer state created by this step is reset to zeros
    when skipped (the initial value of Adam-style moments). Host-side counters (Adam's CPU `step` tensors) still
    advance: the caller reads the norm after the cut and calls `rewind_step_counters` for a skipped step.
    On a device where they live beside the parameters (CPU, CUDA) the mask covers them too.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = torch.isfinite(norm)
    dev = norm.device
    old_params = [p.detach().clone() for p in params]
    before = {(id(state), key): value.clone() for state, key, value in _state_tensors(optimizer, dev)}
    optimizer.step()
    for p, old in zip(params, old_params):
        p.copy_(torch.where(finite, p, old))
    for state, key, value in _state_tensors(optimizer, dev):
        old = before.get((id(state), key))
        if old is None or old.shape != value.shape:
            old = torch.zeros_like(value)
        value.copy_(torch.where(finite, value, old))
    return norm


@torch.no_grad()
def prepare_training(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Bring parameters and optimizer state into their steady-state form before the first step, then cut.

    Without it the first training step compiles graphs of its own: Adam creates its moments inside the step,
    and freshly uploaded parameters enter the forward graph in another form than parameters an optimizer step
    has written. Here both happen in one small graph: an in-place rewrite of every parameter and, for Adam and
    AdamW, one step with zero gradients at lr 0 (moments stay zero, weights unchanged, the count is rewound).
    Other optimizers keep their own first-step graph (their first step is not neutral with zero gradients).
    """
    if not params:
        return
    dev = params[0].device
    keep = torch.ones((), dtype=torch.bool, device=dev)
    for p in params:
        p.copy_(torch.where(keep, p, p.clone()))
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not optimizer.state:
        saved = [(p, p.grad) for p in params]
        lrs = [group["lr"] for group in optimizer.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, grad in saved:
            p.grad = grad
        rewind_step_counters(optimizer, torch.device("meta"))  # every count: this step did not happen
    if is_xla(dev):
        sync()


def rewind_step_counters(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Undo the step count of a step that `masked_optimizer_step` skipped, where the count lives off `device`
    (Adam keeps it on the CPU when the parameters are on XLA, so the device-side mask cannot reach it)."""
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, Tensor) and step.device != torch.device(device):
            step.sub_(1)
        elif isinstance(step, int | float) and not isinstance(step, bool):
            state["step"] = step - 1


# ---------------------------------------------------------------------------------------------- ranks


def init_process_group(timeout_s: float) -> None:
    """Open the `xla` process group (ranks and world size come from the PJRT runtime under torchrun)."""
    require()
    import torch.distributed as dist
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

    if not dist.is_initialized():
        dist.init_process_group("xla", init_method="xla://", timeout=timedelta(seconds=timeout_s))


def gradient_buckets(tensors: Iterable[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive tensors grouped so each group holds at most `bucket_bytes` (a larger tensor goes alone)."""
    buckets: list[list[Tensor]] = []
    current: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def all_reduce_gradients(params: Iterable[nn.Parameter], world_size: int, bucket_mb: float) -> None:
    """Average gradients over ranks through the xla backend, one coalesced all-reduce per bucket of `bucket_mb`.

    A parameter without a gradient takes part as zeros (every rank traces the same graph, lockstep depths), so
    the buckets are the same on every rank.
    """
    params = [p for p in params if p.requires_grad]
    if world_size <= 1 or not params:
        return
    import torch_xla.core.xla_model as xm

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in gradient_buckets([p.grad for p in params], int(bucket_mb * 2**20)):
        xm.all_reduce(xm.REDUCE_SUM, bucket, scale=1.0 / world_size)


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every XLA tensor moved to CPU, for torch.save / safetensors on rank 0."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu() if obj.device.type == "xla" else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def cpu_module(module: nn.Module, empty: nn.Module) -> nn.Module:
    """`empty` (e.g. the model built on "meta") holding CPU copies of `module`'s weights: what a checkpoint
    writer can serialise (safetensors cannot read XLA storage)."""
    empty.load_state_dict(to_cpu(module.state_dict()), assign=True)
    return empty


def load_through_cpu(module: nn.Module, empty: nn.Module, load: Callable[[nn.Module], Any]) -> Any:
    """Run a CPU-side weight loader (`load(cpu_module)`, e.g. a safetensors reader) for a module on XLA: the
    weights are read into `empty` (the model built on "meta") on the CPU, then copied onto the device."""
    cpu = empty.to_empty(device="cpu")
    result = load(cpu)
    module.load_state_dict(cpu.state_dict())
    return result


# ---------------------------------------------------------------------------------------------- compile sweep


def sweep_depth(micro_step: int, k_values: int | list[int]) -> tuple[int, int]:
    """Depth of micro-step `micro_step` in a compile sweep: n cycles 0, 1, 2 (no recurrence graph, the first
    use of the one-iteration graph, its reuse) for each backprop depth k in turn: with graph-stable recurrence
    that is every training graph whatever depth the real run samples. A backprop-depth curriculum passes
    several k values (one set of graphs each); the sweep then needs `SWEEP_STEPS` steps per value."""
    ks = [k_values] if isinstance(k_values, int) else list(k_values)
    return micro_step % 3, ks[(micro_step // 3) % len(ks)]


def sweep_overrides(out_dir: str, eval_interval: int, backprop_depths: int = 1) -> list[str]:
    """Settings overrides of a compile sweep: a few steps into `<out_dir>/compile-sweep`, one validation pass
    (step 0) when the run validates at all, no checkpoint, no ramp, no wandb. Under neuron_parallel_compile the
    numbers are garbage (NEURON_EXTRACT_GRAPHS_ONLY): nothing of it must look like a real run."""
    return [
        f"run.out_dir={out_dir}/compile-sweep",
        "run.resume=never",
        "run.init_from=null",
        f"train.max_steps={SWEEP_STEPS * max(backprop_depths, 1)}",
        "train.max_tokens=null",
        "train.max_nonfinite_steps=1000",
        "train.loss_spike_factor=null",
        "schedule.warmup_steps=1",
        "schedule.cooldown_steps=1",
        "schedule.batch_size_ramp=0",
        f"eval.interval={1000 if eval_interval > 0 else 0}",
        "checkpoint.interval=0",
        "log.interval=1",
        "log.plot=false",
        "log.wandb.mode=disabled",
    ]
