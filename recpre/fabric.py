"""SimpleFabric: processes, devices, precision and gradient all-reduce, so the training loop never asks where it runs.

One object answers "which rank am I, on which device, in which precision" and performs every collective the driver
needs. The `simple-ddp` strategy reduces gradients explicitly, once per optimizer step, by streaming them through a
fixed-size flat buffer (`_GradStream`): it needs no hooks, behaves the same on every backend, and keeps the message
size bounded (a single huge all-reduce hung the Huginn training code's vendor collective plugin at scale: docs/huginn.md).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from recpre import xla as xla_helpers
from recpre.distributed_env import ProcessInfo, discover_processes, parse_slurm_nodelist
from recpre.errors import UserError
from recpre.settings import DEVICES, PRECISIONS, STRATEGIES

__all__ = ["FabricError", "SimpleFabric", "unwrap_model", "parse_slurm_nodelist", "discover_processes", "ProcessInfo"]

T = TypeVar("T")

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
        self.backend = {"cuda": "nccl", "xla": "xla"}.get(self.device.type, "gloo")
        self._owns_group = False
        self._streams: dict[int, _GradStream] = {}
        # Buffers of the simple-ddp gradient stream: 2 overlaps filling one chunk with reducing the previous.
        self.stream_buffers = 2

    def __repr__(self) -> str:
        return (
            f"SimpleFabric(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"device={self.device}, strategy={self.strategy}, precision={self.precision}, source={self.info.source})"
        )

    # ------------------------------------------------------------------ process group

    @property
    def distributed(self) -> bool:
        """Whether collectives talk to a process group (a single-process run needs none)."""
        return self.world_size > 1 or self.strategy in ("simple-ddp", "torch-ddp")

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
        except Exception as err:
            raise FabricError(
                f"{what} failed on rank {self.rank} of {self.world_size}: another rank died or stalled for longer "
                f"than fabric.timeout_s={self.timeout_s:g}s ({type(err).__name__}: {err})"
            ) from err

    # ------------------------------------------------------------------ model and precision

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (and to bf16 for bf16-true), make ranks agree on its weights, wrap for DDP."""
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16-mixed (weights stay fp32); nothing for fp32 and bf16-true."""
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient reduction on accumulation micro-steps (simple-ddp reduces once per step anyway)."""
        ddp = getattr(model, "_orig_mod", model)  # through a torch.compile wrapper
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
        if self.strategy not in ("simple-ddp", "xla") or not self.distributed:
            return
        self.launch()
        if self.strategy == "xla":  # -- xla: bucketed in-graph all-reduce, no host sync (recpre/xla.py)
            params = [p for p in self.unwrap(model).parameters() if p.requires_grad]
            with self._collective("the xla gradient all-reduce"):
                xla_helpers.all_reduce_gradients(params, self.world_size, self.chunk_mb)
            return
        params = [p for p in self.unwrap(model).parameters() if p.requires_grad]
        key = id(model)
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
        device = self.device if self.backend == "nccl" else None
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, for state dicts."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


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


def _pick_device(name: str, local_rank: int) -> torch.device:
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


@dataclass(frozen=True)
class _Piece:
    """A run of `length` elements copied between buffer offset `buf` and flat offset `src` of parameter `index`
    (index -1: the has-gradient flags)."""

    index: int
    src: int
    buf: int
    length: int


class _GradStream:
    """Streams all gradients through fixed-size fp32 buffers (two by default), filling one while another reduces.

    The flat stream is [one has-gradient flag per parameter] + [every parameter's gradient, in model order];
    chunk c covers stream elements [c * C, (c + 1) * C) whatever the parameter boundaries. The flags come first
    so a parameter's global has-gradient count is known before its values are written back.
    """

    def __init__(
        self, params: list[nn.Parameter], chunk_elements: int, device: torch.device, num_buffers: int = 2
    ) -> None:
        self.params = params
        self._ids = [id(p) for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        sizes = [p.numel() for p in params]
        n_flags = len(params)
        total = n_flags + sum(sizes)
        size = max(1, min(chunk_elements, total))
        self.buffers = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(max(1, num_buffers))]
        self.device = device
        # Segments of the flat stream: (index, start, length); index -1 is the flag segment.
        segments = [(-1, 0, n_flags)]
        start = n_flags
        for i, n in enumerate(sizes):
            segments.append((i, start, n))
            start += n
        self.chunks: list[list[_Piece]] = []
        for c0 in range(0, total, size):
            c1 = min(c0 + size, total)
            pieces = []
            for index, s0, n in segments:
                a, b = max(c0, s0), min(c1, s0 + n)
                if a < b:
                    pieces.append(_Piece(index, a - s0, a - c0, b - a))
            self.chunks.append(pieces)
        self.chunk_lengths = [min(c0 + size, total) - c0 for c0 in range(0, total, size)]

    def matches(self, params: list[nn.Parameter]) -> bool:
        return [id(p) for p in params] == self._ids and [tuple(p.shape) for p in params] == self.shapes

    def check_same_layout(self, rank: int) -> None:
        """Ranks with different models would silently add unrelated numbers: refuse instead."""
        digest = hash(tuple(self.shapes)) % (2**62)
        probe = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX)
        if int(probe[0]) != digest or int(probe[1]) != -digest:
            raise FabricError(
                f"rank {rank}'s model has a different parameter layout from another rank's; "
                "every rank must build the same model for fabric.strategy=simple-ddp."
            )

    def reduce(self, world_size: int) -> None:
        grads = []
        for p in self.params:
            g = p.grad
            if g is not None and g.is_sparse:
                raise FabricError("simple-ddp cannot reduce sparse gradients; use fabric.strategy=torch-ddp.")
            if g is not None and not g.is_contiguous():
                p.grad = g = g.contiguous()
            grads.append(g)
        flags = torch.tensor([0.0 if g is None else 1.0 for g in grads], dtype=torch.float32).to(self.device)
        global_flags: list[float] = [0.0] * len(grads)
        pending: deque = deque()
        for c, pieces in enumerate(self.chunks):
            if len(pending) == len(self.buffers):  # the buffer we are about to fill is still in flight
                self._write_back(*pending.popleft(), world_size, global_flags)
            buf = self.buffers[c % len(self.buffers)][: self.chunk_lengths[c]]
            for piece in pieces:
                dst = buf[piece.buf : piece.buf + piece.length]
                if piece.index < 0:
                    dst.copy_(flags[piece.src : piece.src + piece.length])
                elif grads[piece.index] is None:
                    dst.zero_()
                else:
                    dst.copy_(grads[piece.index].view(-1)[piece.src : piece.src + piece.length])
            pending.append((dist.all_reduce(buf, async_op=True), buf, pieces))
        while pending:
            self._write_back(*pending.popleft(), world_size, global_flags)

    def _write_back(self, work, buf: torch.Tensor, pieces: list[_Piece], world_size: int, global_flags) -> None:
        work.wait()
        for piece in pieces:
            src = buf[piece.buf : piece.buf + piece.length]
            if piece.index < 0:
                global_flags[piece.src : piece.src + piece.length] = src.tolist()
                continue
            p = self.params[piece.index]
            if p.grad is None:
                if global_flags[piece.index] == 0:
                    continue  # no rank has a gradient for it: leave None, as a single process would
                p.grad = torch.zeros_like(p)
            dst = p.grad.view(-1)[piece.src : piece.src + piece.length]
            torch.div(src, world_size, out=dst) if dst.dtype == torch.float32 else dst.copy_(src / world_size)
