"""SimpleFabric: processes, devices, precision and gradient all-reduce, so the training loop never asks where it runs.

One object answers "which rank am I, on which device, in which precision" and performs every collective the driver
needs. The `simple-ddp` strategy reduces gradients explicitly, once per optimizer step, by streaming them through a
fixed-size flat buffer (recpre/grad_stream.py): it needs no hooks, behaves the same on every backend, and keeps the
message size bounded (a single huge all-reduce hung the Huginn training code's vendor
collective plugin at scale: docs/huginn.md).
With `optimizer_sharding` the same stream reduce-scatters and all-gathers (ZeRO-1, recpre/zero.py); `fsdp` and
`hsdp` shard parameters, gradients and optimizer state with torch's FSDP2 (recpre/sharding.py). The driver calls the
same methods under every strategy: setup_model, setup_optimizer, no_sync, all_reduce_gradients, clip_grad_norm,
optimizer_step, full_state_dict / load_full_state_dict and memory_report.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from recpre import neuron
from recpre import xla as xla_helpers
from recpre.distributed_env import ProcessInfo, discover_processes, parse_slurm_nodelist
from recpre.errors import UserError
from recpre.grad_stream import GradStream as _GradStream
from recpre.grad_stream import StreamError
from recpre.settings import DEVICES, PRECISIONS, STRATEGIES
from recpre.unwrap import unwrap_model

if TYPE_CHECKING:
    from recpre.sharding import InitParameter

__all__ = ["FabricError", "SimpleFabric", "unwrap_model", "parse_slurm_nodelist", "discover_processes", "ProcessInfo"]

T = TypeVar("T")

SHARDED = ("fsdp", "hsdp")  # parameters, gradients and optimizer state sharded by FSDP2 (recpre/sharding.py)
_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class FabricError(RuntimeError):
    """A collective or the rendezvous failed: a rank died, stalled past fabric.timeout_s, or is unreachable."""


class SimpleFabric:
    """Rank, device, precision and collectives for one training process.

    `fabric_settings` is any object with attributes strategy, precision, device, chunk_mb and timeout_s (the
    `fabric` section of the settings). `env` defaults to `os.environ` and is only read, never written.
    """

    def __init__(self, fabric_settings: Any, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        self.info: ProcessInfo = discover_processes(self._env)
        self.rank = self.info.rank
        self.world_size = self.info.world_size
        self.local_rank = self.info.local_rank
        self.is_main = self.rank == 0

        strategy = str(fabric_settings.strategy)
        precision = str(fabric_settings.precision)
        device = str(fabric_settings.device)
        if strategy not in STRATEGIES:
            raise UserError(f"fabric.strategy={strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
        if precision not in PRECISIONS:
            raise UserError(f"fabric.precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
        if device not in DEVICES:
            raise UserError(f"fabric.device={device!r} is unknown; use one of {', '.join(DEVICES)}.")
        self.chunk_mb = float(fabric_settings.chunk_mb)
        if not self.chunk_mb > 0:
            raise UserError(f"fabric.chunk_mb must be positive, got {fabric_settings.chunk_mb}.")
        self.timeout_s = float(fabric_settings.timeout_s)
        if not self.timeout_s > 0:
            raise UserError(f"fabric.timeout_s must be positive, got {fabric_settings.timeout_s}.")

        if device == "auto" and neuron.runtime().native_device_present():
            device = "neuron"  # -- neuron: the native TorchNeuron device (recpre/neuron.py), trn2/trn3
        if strategy == "auto" and device == "auto" and xla_helpers.accelerator_present(self._env):
            strategy = "xla"  # -- xla: torch_xla and a Neuron/TPU device (recpre/xla.py)
        if strategy == "xla" or device == "xla":
            strategy, device = "xla", "xla"
        elif strategy == "auto":
            strategy = "single" if self.world_size == 1 else "simple-ddp"
        elif strategy == "single" and self.world_size > 1:
            raise UserError(
                f"fabric.strategy=single but {self.world_size} processes were launched; "
                "use fabric.strategy=simple-ddp or torch-ddp."
            )
        self.strategy = strategy
        self.device = _pick_device(device, self.local_rank)
        if precision != "fp32" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"fabric.precision={precision} needs bf16 support, which this GPU lacks; use fp32.")
        self.precision = precision
        self.native_neuron = device == "neuron"
        backends = {"cuda": "nccl", "xla": "xla"}
        self.backend = neuron.runtime().dist_backend if self.native_neuron else backends.get(self.device.type, "gloo")
        self._owns_group = False
        self._streams: dict[int, _GradStream] = {}
        # Buffers of the simple-ddp gradient stream: 2 overlaps filling one chunk with reducing the previous.
        self.stream_buffers = 2
        self._configure_sharding(fabric_settings)

    def _configure_sharding(self, fabric_settings: Any) -> None:
        self.optimizer_sharding = bool(getattr(fabric_settings, "optimizer_sharding", False))
        self.offload = bool(getattr(fabric_settings, "offload", False))
        node = _node_size(self._env, self.world_size)
        shard_size = getattr(fabric_settings, "shard_size", None)
        if self.strategy == "hsdp":
            self.shard_size = int(shard_size) if shard_size else node
        elif self.strategy == "fsdp":
            self.shard_size = self.world_size
        else:
            world = str(getattr(fabric_settings, "shard_group", "node")) == "world"
            self.shard_size = self.world_size if world else node
        if self.world_size % self.shard_size and (self.strategy == "hsdp" or self.optimizer_sharding):
            raise UserError(
                f"shard groups of {self.shard_size} ranks do not divide the {self.world_size} ranks; set "
                "fabric.shard_size (hsdp) or fabric.shard_group=world to a size that divides the world."
            )
        if self.strategy in SHARDED and self.device.type not in ("cuda", "cpu", neuron.DEVICE_TYPE):
            raise UserError(
                f"fabric.strategy={self.strategy} runs on CUDA/ROCm, Neuron or the CPU, not on {self.device}."
            )
        if self.offload and self.device.type != "cuda":
            raise UserError(
                f"fabric.offload=true keeps GPU memory in CPU memory, but this run is on {self.device}; "
                "set fabric.offload=false."
            )
        if self.optimizer_sharding and self.strategy != "simple-ddp":
            raise UserError(f"fabric.optimizer_sharding needs fabric.strategy=simple-ddp, not {self.strategy}.")
        self._mesh = None
        self._zero = None

    def __repr__(self) -> str:
        return (
            f"SimpleFabric(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"device={self.device}, strategy={self.strategy}, precision={self.precision}, source={self.info.source})"
        )

    # ------------------------------------------------------------------ process group

    @property
    def distributed(self) -> bool:
        """Whether collectives talk to a process group (a single-process run needs none)."""
        return self.world_size > 1 or self.strategy in ("simple-ddp", "torch-ddp", *SHARDED)

    def launch(self) -> SimpleFabric:
        """Open the process group and prove it works with one all-reduce. Idempotent."""
        if not self.distributed or dist.is_initialized():
            return self
        timeout = timedelta(seconds=self.timeout_s)
        addr, port = self.info.master_addr, self.info.master_port
        where = f"MASTER_ADDR={addr} MASTER_PORT={port}"
        if self.backend == "xla":  # -- xla: ranks come from the PJRT runtime (xla:// init)
            try:
                xla_helpers.init_process_group(self.timeout_s)
            except Exception as err:
                raise FabricError(f"rank {self.rank} could not join the xla process group via {where}: {err}") from err
            self._owns_group = True
            return self
        if self.world_size == 1:
            store: dist.Store = dist.HashStore()
        else:
            # Under torchrun the agent already serves a store on MASTER_PORT; everyone connects as a client.
            agent_store = str(self._env.get("TORCHELASTIC_USE_AGENT_STORE", "")).lower() == "true"
            try:
                store = dist.TCPStore(
                    addr,
                    port,
                    self.world_size,
                    is_master=self.rank == 0 and not agent_store,
                    timeout=timeout,
                    wait_for_workers=False,
                )
            except Exception as err:
                raise FabricError(
                    f"rank {self.rank} could not open the rendezvous store at {where} within "
                    f"fabric.timeout_s={self.timeout_s:g}s: check that rank 0 runs on {addr}, that the port is free "
                    f"and reachable from every node ({type(err).__name__}: {err})"
                ) from err
        kwargs: dict[str, Any] = {}
        if self.device.type == "cuda":
            kwargs["device_id"] = self.device
        try:
            dist.init_process_group(
                self.backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout, **kwargs
            )
        except Exception as err:
            raise FabricError(
                f"rank {self.rank} could not join the {self.backend} process group of {self.world_size} via {where} "
                f"within fabric.timeout_s={self.timeout_s:g}s: are all ranks started and able to reach each other? "
                f"({type(err).__name__}: {err})"
            ) from err
        self._owns_group = True
        probe = torch.ones(1, device=self.device)
        try:
            dist.all_reduce(probe)
            ok = int(probe.item()) == self.world_size
        except Exception as err:
            raise FabricError(
                f"the start-up all_reduce over {self.world_size} ranks failed on rank {self.rank} ({where}, backend "
                f"{self.backend}): the interconnect between the nodes is broken or a rank did not start "
                f"({type(err).__name__}: {err})"
            ) from err
        if not ok:
            raise FabricError(
                f"the start-up all_reduce returned {probe.item()} instead of {self.world_size} on rank {self.rank} "
                f"({where}, backend {self.backend}): the collective library is misconfigured."
            )
        return self

    def teardown(self) -> None:
        """Close the process group this fabric opened. Idempotent."""
        self._streams.clear()
        if self._owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._owns_group = False

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except FabricError:
            raise
        except StreamError as err:
            raise FabricError(str(err)) from err
        except Exception as err:
            raise FabricError(
                f"{what} failed on rank {self.rank} of {self.world_size}: another rank died or stalled for longer "
                f"than fabric.timeout_s={self.timeout_s:g}s ({type(err).__name__}: {err})"
            ) from err

    # ------------------------------------------------------------------ model and precision

    @property
    def builds_on_meta(self) -> bool:
        """Whether the driver builds the model on the meta device: setup_model then materialises only this
        rank's shards, initialised with the model's `init_parameter` (no rank ever holds the full model)."""
        return self.strategy in SHARDED

    @property
    def mesh(self) -> Any:
        """The device mesh of fsdp (1-D) and hsdp (replicate x shard) and of per-node optimizer sharding."""
        if self._mesh is None:
            from recpre.sharding import build_mesh

            self.launch()
            with self._collective("building the device mesh"):
                self._mesh = build_mesh(self.device.type, self.world_size, self.shard_size)
        return self._mesh

    def setup_model(self, model: nn.Module, init_parameter: InitParameter | None = None) -> nn.Module:
        """Move the model to the device (and to bf16 for bf16-true), make ranks agree on its weights, wrap for DDP;
        under fsdp/hsdp shard it per block (a meta-device model is materialised shard by shard, each full parameter
        drawn by `init_parameter(name, tensor)`, default the model's own)."""
        if self.strategy in SHARDED:
            from recpre.sharding import shard_model

            with self._collective(f"sharding the model ({self.strategy})"):
                return shard_model(
                    model, self.mesh, precision=self.precision, offload=self.offload, device=self.device,
                    init_parameter=init_parameter,
                )  # fmt: skip
        model = model.to(self.device)
        if self.precision == "bf16-true":
            model = model.to(torch.bfloat16)
        if not self.distributed:
            return model
        self.launch()
        if self.strategy == "torch-ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            with self._collective("wrapping the model in DistributedDataParallel"):
                return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.chunk_mb)
        with self._collective("broadcasting the initial weights from rank 0"), torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model)

    def compile_options(self) -> dict[str, Any]:
        """torch.compile keywords for this device: the Neuron Dynamo backend on the native device, else defaults."""
        return {"backend": neuron.runtime().compile_backend} if self.native_neuron else {}

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16-mixed (weights stay fp32); nothing for fp32 and bf16-true."""
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient reduction on accumulation micro-steps (simple-ddp reduces once per step anyway)."""
        ddp = getattr(model, "_orig_mod", model)  # through a torch.compile wrapper
        if self.strategy in SHARDED:
            from recpre.sharding import gradient_sync

            return gradient_sync(ddp, not enabled)
        if enabled and self.strategy == "torch-ddp" and isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ gradients

    def all_reduce_gradients(self, model: nn.Module) -> None:
        """Average gradients over ranks (call once per optimizer step, after the last backward).

        torch-ddp has already done it during backward; single has nothing to do. With simple-ddp every rank must
        call this with the same model structure; a parameter whose gradient is None on some ranks takes part as
        zeros and ends with the averaged gradient on all ranks (None stays None only where it is None everywhere).
        """
        if self.strategy in SHARDED:  # FSDP reduce-scattered during backward; free the looped core's gather
            from recpre.sharding import reshard_looped

            reshard_looped(self.unwrap(model))
            return
        if self._zero is not None:
            with self._collective("the gradient reduce-scatter"):
                self._zero.reduce_gradients()
            return
        if self.strategy not in ("simple-ddp", "xla") or not self.distributed:
            return
        self.launch()
        if self.strategy == "xla":  # -- xla: bucketed in-graph all-reduce, no host sync (recpre/xla.py)
            params = [p for p in self.unwrap(model).parameters() if p.requires_grad]
            with self._collective("the xla gradient all-reduce"):
                xla_helpers.all_reduce_gradients(params, self.world_size, self.chunk_mb)
            return
        self._reduce_stream([p for p in self.unwrap(model).parameters() if p.requires_grad], id(model))

    def _reduce_stream(self, params: list[nn.Parameter], key: int) -> None:
        stream = self._streams.get(key)
        if stream is None or not stream.matches(params):
            stream = _GradStream(params, self.chunk_elements, self.device, self.stream_buffers)
            with self._collective("checking that all ranks hold the same parameter layout"):
                stream.check_same_layout(self.rank)
            self._streams[key] = stream
        with self._collective("the gradient all-reduce"):
            stream.reduce(self.world_size)

    @property
    def chunk_elements(self) -> int:
        """Elements of the fp32 streaming buffer (fabric.chunk_mb megabytes, MiB)."""
        return max(1, int(self.chunk_mb * 2**20) // 4)

    def loss_normalizer(self, local_targets: int | torch.Tensor) -> float:
        """The divisor each rank gives its summed token loss so the averaged gradient is the global token mean.

        Gradients are averaged over the world, so each rank divides by (global target count / world size);
        pass the target count of all this rank's micro-batches of the step.
        """
        total = self.all_reduce(torch.tensor(float(local_targets), dtype=torch.float64), op="sum")
        return float(total) / self.world_size

    # ------------------------------------------------------------------ optimizer step and state

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """The optimizer the driver steps: under optimizer_sharding a ZeroOptimizer over this rank's part of the
        parameters (recpre/zero.py); otherwise `optimizer` itself (under fsdp/hsdp its state is sharded already,
        since it was built over the sharded parameters)."""
        if not (self.optimizer_sharding and self.world_size > 1):
            return optimizer
        from recpre.zero import ZeroOptimizer

        self.launch()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        group = replicas = None
        if self.shard_size < self.world_size:
            group, replicas = self.mesh.get_group("shard"), self.mesh.get_group("replicate")
        rank = self.rank % self.shard_size
        with self._collective("sharding the optimizer state"):
            self._zero = ZeroOptimizer(
                optimizer,
                params,
                stream_factory=lambda parts: _GradStream(
                    params, self.chunk_elements, self.device, self.stream_buffers, flags=False, parts=parts
                ),
                rank=rank,
                shard_size=self.shard_size,
                world_size=self.world_size,
                group=group,
                replicas=replicas,
                all_reduce_gradients=lambda: self._reduce_stream(params, id(optimizer)),
            )
        return self._zero

    def clip_grad_norm(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
        """Global gradient norm over all ranks' shards (the same number on every rank), clipped to max_norm."""
        if self._zero is not None:
            with self._collective("the gradient norm"):
                return self._zero.clip_grad_norm(max_norm)
        if self.strategy in SHARDED:  # the sharded parameters: a list taken while FSDP had the root gathered
            from recpre.sharding import clip_grad_norm  # (after a no-grad forward) holds its unsharded copies

            params = [p for p in self.unwrap(model).parameters() if p.requires_grad]
            with self._collective("the gradient norm"):
                return clip_grad_norm(params, max_norm)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, optimizer: Any) -> None:
        """One optimizer step; with optimizer sharding every rank then holds the same updated weights."""
        with self._collective("the optimizer step"):
            optimizer.step()

    def full_state_dict(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """{"model": weights, "optimizer": index-keyed optimizer state} as one process holds them, complete on
        rank 0 (other ranks may get partial or empty entries). Every rank must call it (it gathers shards)."""
        if self.strategy in SHARDED:
            from recpre.sharding import full_model_state, full_optimizer_state

            with self._collective("gathering the full model and optimizer state"):
                inner = self.unwrap(model)
                return {
                    "model": full_model_state(inner, self.is_main),
                    "optimizer": full_optimizer_state(optimizer, self.is_main),
                }
        state = {"model": self.unwrap(model).state_dict()}
        if self._zero is not None:
            with self._collective("gathering the sharded optimizer state"):
                state["optimizer"] = self._zero.full_state_dict(self.is_main)
        else:
            state["optimizer"] = optimizer.state_dict()
        return state

    def load_full_state_dict(
        self, model: nn.Module, optimizer: Any, state: Mapping[str, Any], source: str, strict: bool = True
    ) -> None:
        """Load full_state_dict's format: each rank keeps its shards. "model" (a mapping of full tensors, which may
        read lazily) and "optimizer" may each be absent or None; hyperparameters stay this run's. With `strict`
        False, parameters the mapping lacks keep their values (a name the model lacks is still refused)."""
        from recpre.optim import load_optimizer_state

        inner = self.unwrap(model)
        weights, saved = state.get("model"), state.get("optimizer")
        if weights is not None:
            if self.strategy in SHARDED:
                from recpre.sharding import load_model_state

                try:
                    load_model_state(inner, weights, strict=strict)
                except KeyError as err:
                    raise UserError(f"weights in {source} do not fit this model ({err.args[0]})") from None
            else:
                unexpected = inner.load_state_dict(weights, strict=strict).unexpected_keys
                if unexpected:
                    raise UserError(f"weights in {source} do not fit this model (unexpected {unexpected[:5]})")
        if optimizer is None or saved is None:
            return
        if self.strategy in SHARDED:
            from recpre.sharding import load_optimizer_full_state

            load_optimizer_full_state(optimizer, saved, source=source)
        elif self._zero is not None:
            self._zero.load_full_state_dict(saved, source=source)
        else:
            load_optimizer_state(optimizer, saved, source=source)

    def memory_report(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The memory event: this rank's bytes of parameters, gradients and optimizer state as held (measured from
        the tensors' storage), and the device allocator's peak where there is one."""
        from recpre.memory import memory_report

        report = memory_report(self.unwrap(model), optimizer, self.device)
        return {"event": "memory", "strategy": self.strategy, "optimizer_sharding": self._zero is not None, **report}

    # ------------------------------------------------------------------ collectives for the driver

    def all_reduce(self, tensor: torch.Tensor | float, op: str = "sum") -> torch.Tensor | float:
        """Reduce over ranks in place ("sum", "mean", "max", "min"); a Python number returns a float."""
        if op not in _OPS:
            raise ValueError(f"all_reduce op must be one of {sorted(_OPS)}, got {op!r}")
        as_number = not isinstance(tensor, torch.Tensor)
        if as_number:
            tensor = torch.tensor(float(tensor), dtype=torch.float64)
        if self.distributed and self.world_size > 1:
            self.launch()
            work = tensor
            if tensor.device != self.device:
                work = tensor.to(self.device)
            if self.backend == "xla" and work.dtype == torch.float64:  # -- xla: Neuron has no float64
                work = work.float()
            with self._collective(f"all_reduce({op})"):
                dist.all_reduce(work, op=_OPS[op])
            if op == "mean":
                work.div_(self.world_size)
            if work is not tensor:
                tensor.copy_(work)
        return float(tensor) if as_number else tensor

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Every rank receives rank `src`'s (picklable) object."""
        if not (self.distributed and self.world_size > 1):
            return obj
        self.launch()
        box = [obj]
        device = self.device if self.backend == "nccl" or self.native_neuron else None
        with self._collective("broadcast_object"):
            dist.broadcast_object_list(box, src=src, device=device)
        return box[0]

    def barrier(self) -> None:
        """Wait for all ranks (an all-reduce, so it honours the timeout on every backend)."""
        if self.distributed and self.world_size > 1:
            self.launch()
            with self._collective("barrier"):
                dist.all_reduce(torch.zeros(1, device=self.device))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if any rank says True: one rank asking to stop stops all (MAX, not MIN)."""
        if not (self.distributed and self.world_size > 1):
            return bool(flag)
        self.launch()
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        with self._collective("any_rank"):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print on rank 0 only."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def seed_everything(self, seed: int, per_rank: bool = False) -> int:
        """Seed python, numpy and torch; per_rank offsets by the rank (data order, dropout). Returns the seed."""
        value = int(seed) + (self.rank if per_rank else 0)
        random.seed(value)
        torch.manual_seed(value)
        with contextlib.suppress(ImportError):
            import numpy as np

            np.random.seed(value % 2**32)
        return value

    def sync(self) -> None:
        """Step boundary: cut the lazy graph on XLA; nothing elsewhere."""
        if self.device.type == "xla":
            import torch_xla

            torch_xla.sync()


def resolve_device(name: str = "auto") -> torch.device:
    """A single-process tool's device, chosen as training chooses it: `auto` is CUDA/ROCm, else MPS, else CPU;
    `cuda:N` names one GPU."""
    if name.startswith("cuda:") and name[5:].isdigit():
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name[5:]) >= count:
            raise UserError(f"--device {name}: only {count} CUDA/ROCm GPU(s) are visible; use --device auto or cpu")
        return torch.device(name)
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} must be auto, cpu, cuda, cuda:N or mps")
    return _pick_device(name, 0)


def _neuron_device(local_rank: int) -> torch.device:
    """This rank's NeuronCore on the native TorchNeuron device; a UserError naming the install without it."""
    rt = neuron.require_runtime()
    count = rt.device_count()
    if count < 1:
        raise UserError("fabric.device=neuron but no NeuronCore is visible; run on a trn2/trn3 instance or use auto.")
    if local_rank >= count and count > 1:
        raise UserError(f"local rank {local_rank} has no NeuronCore: only {count} are visible on this node.")
    return rt.device(local_rank)


def _node_size(env: Mapping[str, str], world_size: int) -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node ("8" or "8(x4)"), else the world."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        raw = str(env.get(key, "")).split("(")[0].split(",")[0].strip()
        if raw.isdigit() and int(raw) > 0:
            return min(int(raw), world_size)
    return world_size


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "neuron":
        return _neuron_device(local_rank)
    if name == "xla":
        try:
            import torch_xla
        except ImportError:
            raise UserError(
                "fabric.strategy=xla needs torch_xla (the AWS Neuron SDK's torch-neuronx / torch-xla); install it "
                "in this environment or choose another fabric.strategy."
            ) from None
        return torch_xla.device()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("fabric.device=cuda but no CUDA/ROCm GPU is visible; use fabric.device=cpu or auto.")
        count = torch.cuda.device_count()
        # One GPU per task (SLURM --gpus-per-task) shows each task a single device 0.
        index = 0 if count == 1 else local_rank
        if index >= count:
            raise UserError(f"local rank {local_rank} has no GPU: only {count} are visible on this node.")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("fabric.device=mps but MPS is not available; use fabric.device=cpu or auto.")
        return torch.device("mps")
    return torch.device("cpu")
