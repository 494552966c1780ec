"""The chunk stream: every gradient of a model through fixed-size fp32 buffers, as all-reduce (simple-ddp) or as
reduce-scatter plus all-gather (optimizer sharding), whatever the parameter boundaries.

A single huge collective is what hung the reference system's vendor collective plugin at scale; fixed chunks keep
every message the same bounded size, and two buffers overlap filling one chunk with reducing the previous.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class StreamError(RuntimeError):
    """The stream cannot carry these gradients (sparse, or a layout that differs between ranks)."""


@dataclass(frozen=True)
class _Piece:
    """A run of `length` elements copied between buffer offset `buf` and flat offset `src` of parameter `index`
    (index -1: the has-gradient flags)."""

    index: int
    src: int
    buf: int
    length: int


class GradStream:
    """Streams all gradients through fixed-size fp32 buffers (two by default), filling one while another reduces.

    The flat stream is [one has-gradient flag per parameter] + [every parameter's gradient, in model order];
    chunk c covers stream elements [c * C, (c + 1) * C) whatever the parameter boundaries. The flags come first
    so a parameter's global has-gradient count is known before its values are written back.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        chunk_elements: int,
        device: torch.device,
        num_buffers: int = 2,
        *,
        flags: bool = True,
        parts: int = 1,
    ) -> None:
        self.params = params
        self._ids = [id(p) for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        sizes = [p.numel() for p in params]
        n_flags = len(params) if flags else 0
        total = n_flags + sum(sizes)
        # `parts` > 1 (optimizer sharding): every chunk splits into `parts` equal slices, slice r owned by rank r.
        self.parts = max(1, parts)
        size = max(1, min(chunk_elements, total))
        size = max(self.parts, size - size % self.parts)
        self.buffers = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(max(1, num_buffers))]
        self.device = device
        # Segments of the flat stream: (index, start, length); index -1 is the flag segment.
        segments = [(-1, 0, n_flags)] if flags else []
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
        self.data_lengths = [min(c0 + size, total) - c0 for c0 in range(0, total, size)]
        self.chunk_lengths = [-(-n // self.parts) * self.parts for n in self.data_lengths]
        self._slices = [torch.empty(size // self.parts, dtype=torch.float32, device=device) for _ in self.buffers]

    def matches(self, params: list[nn.Parameter]) -> bool:
        return [id(p) for p in params] == self._ids and [tuple(p.shape) for p in params] == self.shapes

    def check_same_layout(self, rank: int) -> None:
        """Ranks with different models would silently add unrelated numbers: refuse instead."""
        digest = hash(tuple(self.shapes)) % (2**62)
        probe = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX)
        if int(probe[0]) != digest or int(probe[1]) != -digest:
            raise StreamError(
                f"rank {rank}'s model has a different parameter layout from another rank's; "
                "every rank must build the same model for fabric.strategy=simple-ddp."
            )

    def _gradients(self) -> list[torch.Tensor | None]:
        grads = []
        for p in self.params:
            g = p.grad
            if g is not None and g.is_sparse:
                raise StreamError("simple-ddp cannot reduce sparse gradients; use fabric.strategy=torch-ddp.")
            if g is not None and not g.is_contiguous():
                p.grad = g = g.contiguous()
            grads.append(g)
        return grads

    def _fill(self, c: int, grads: list[torch.Tensor | None], flags: torch.Tensor | None = None) -> torch.Tensor:
        """Chunk c of the stream in a free buffer (missing gradients and the padding of the last chunk as zeros)."""
        buf = self.buffers[c % len(self.buffers)][: self.chunk_lengths[c]]
        for piece in self.chunks[c]:
            dst = buf[piece.buf : piece.buf + piece.length]
            if piece.index < 0:
                dst.copy_(flags[piece.src : piece.src + piece.length])
            elif grads[piece.index] is None:
                dst.zero_()
            else:
                dst.copy_(grads[piece.index].view(-1)[piece.src : piece.src + piece.length])
        buf[self.data_lengths[c] :].zero_()
        return buf

    def reduce(self, world_size: int) -> None:
        grads = self._gradients()
        flags = torch.tensor([0.0 if g is None else 1.0 for g in grads], dtype=torch.float32).to(self.device)
        global_flags: list[float] = [0.0] * len(grads)
        pending: deque = deque()
        for c, pieces in enumerate(self.chunks):
            if len(pending) == len(self.buffers):  # the buffer we are about to fill is still in flight
                self._write_back(*pending.popleft(), world_size, global_flags)
            buf = self._fill(c, grads, flags)
            pending.append((dist.all_reduce(buf, async_op=True), buf, pieces))
        while pending:
            self._write_back(*pending.popleft(), world_size, global_flags)

    # -- optimizer sharding (recpre/zero.py): slice r of every chunk belongs to rank r of the shard group

    def owned(self, rank: int, c: int | None = None) -> list[_Piece]:
        """This rank's pieces (of chunk c, or of all chunks), `buf` relative to the chunk's start."""
        out = []
        for chunk in range(len(self.chunks)) if c is None else (c,):
            part = self.chunk_lengths[chunk] // self.parts
            lo, hi = rank * part, (rank + 1) * part
            for piece in self.chunks[chunk]:
                a, b = max(lo, piece.buf), min(hi, piece.buf + piece.length)
                if a < b:
                    out.append(_Piece(piece.index, piece.src + a - piece.buf, a, b - a))
        return out

    def reduce_scatter(self, rank: int, world_size: int, present: list[bool], group=None, replicas=None) -> None:
        """Average the gradients over all ranks, but write back only this rank's slice of each chunk into p.grad.

        The chunks are reduce-scattered inside `group` (the shard group), and the slices all-reduced across
        `replicas` (the other shard groups; None when the state is sharded over the whole world). Parameters
        with no gradient on any rank (`present` False) keep grad None.
        """
        grads = self._gradients()
        pending: deque = deque()

        def land(work, c: int, out: torch.Tensor) -> None:
            work.wait()
            if replicas is not None:
                dist.all_reduce(out, group=replicas)
            lo = rank * len(out)
            for piece in self.owned(rank, c):
                if not present[piece.index]:
                    continue
                p = self.params[piece.index]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dst = p.grad.view(-1)[piece.src : piece.src + piece.length]
                dst.copy_(out[piece.buf - lo : piece.buf - lo + piece.length] / world_size)

        for c in range(len(self.chunks)):
            if len(pending) == len(self.buffers):
                land(*pending.popleft())
            buf = self._fill(c, grads)
            out = self._slices[c % len(self._slices)][: self.chunk_lengths[c] // self.parts]
            pending.append((dist.reduce_scatter_single(out, buf, group=group, async_op=True), c, out))
        while pending:
            land(*pending.popleft())

    def all_gather(self, rank: int, group=None) -> None:
        """Each rank sends its (updated) slice of every chunk; every parameter ends equal on all ranks."""
        pending: deque = deque()

        def land(work, c: int, buf: torch.Tensor) -> None:
            work.wait()
            with torch.no_grad():
                for piece in self.chunks[c]:
                    dst = self.params[piece.index].view(-1)[piece.src : piece.src + piece.length]
                    dst.copy_(buf[piece.buf : piece.buf + piece.length])

        for c in range(len(self.chunks)):
            if len(pending) == len(self.buffers):
                land(*pending.popleft())
            buf = self.buffers[c % len(self.buffers)][: self.chunk_lengths[c]]
            mine = self._slices[c % len(self._slices)][: self.chunk_lengths[c] // self.parts]
            lo = rank * len(mine)
            mine.zero_()
            for piece in self.owned(rank, c):
                src = self.params[piece.index].detach().view(-1)[piece.src : piece.src + piece.length]
                mine[piece.buf - lo : piece.buf - lo + piece.length].copy_(src)
            pending.append((dist.all_gather_single(buf, mine, group=group, async_op=True), c, buf))
        while pending:
            land(*pending.popleft())

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
