"""PackedLoader: packed parquet rows -> (input_ids, labels) batches for one rank, exactly once per epoch.

Order of one epoch of one source: a global order of micro-batches that does not depend on the world size,
dealt out to the ranks micro-batch by micro-batch. The same computation runs on every rank, from `seed`, the
epoch and `micro_batch_size` (mb):
  1. the source's row groups (over all its files) are permuted: a stream of N rows;
  2. the stream is cut into windows of `window` rows (~64M tokens, a multiple of mb), each window into
     `lanes` contiguous lanes (LANES = 128, fewer for small windows so a lane keeps >= max(MIN_LANE_ROWS, mb)
     rows). The window's positions form chunks of mb; chunk c belongs to lane c % lanes, and its rows are
     rows (c // lanes) * mb + j of that lane in a per-(epoch, window, lane) random order. Consecutive chunks
     thus come from different lanes (different parts of the data), and the chunks of one residue class
     modulo a world size that divides `lanes` are whole lanes;
  3. the first U = N // (world_size * mb) * (world_size * mb) positions are used, as G = U / mb global
     micro-batches: global micro-batch g is the positions [g * mb, (g + 1) * mb), in order. Rank r's k-th
     micro-batch of the epoch is global micro-batch g = r + world_size * k.
So every row is read at most once per epoch, by one rank, and every rank yields exactly G / world_size
batches: ranks never disagree on the batch count (a disagreement would hang DDP). The leftover N - U rows
(fewer than world_size * mb, at the epoch's end) are skipped in that epoch; since the row-group order changes
each epoch, different rows are skipped each time. With N divisible by world_size * mb, the union over ranks
of an epoch is exactly the dataset.

Global micro-batch index: `global_batch_index(k)` = rank + world_size * k names the rank's k-th batch of the
run (k counts from 0 over all epochs, as `step` does) in one run-wide numbering shared by all ranks; it is
what depth and noise draws should be seeded by. World-size invariance (single source, i.e. no `weights`): at
a fixed micro_batch_size, a training step that takes A micro-batches per rank takes global micro-batches
[s * W * A, (s + 1) * W * A), so the step's micro-batches (and the global index of each) are the same row
sets in the same row order whatever the world size W. This holds within the first epoch, and in every
epoch when the usable count U is the same for the world sizes compared (N divisible by each W x mb); past an
epoch whose skipped tail differs, the steps of different world sizes differ.
Reads: a rank reads, once per window, only the row groups that hold its rows, and holds about
window / world_size rows. For world sizes dividing the lane count it owns whole lanes, so it reads ~1.5x the
rows it uses (lane edges cut row groups); beyond, about world_size / lanes x that, never more than the
row-group size.

Several paths without weights are one dataset. With `weights`, each path is a source with its own global
order and epochs; a rank's rows of a source are taken in the order above (its k-th row is row k % mb of its
micro-batch k // mb). Every row of a batch picks its source with those probabilities, from a generator
seeded by (seed, batch index) and identical on all ranks, so ranks stay in lockstep. The draws are per rank
batch, so a mixture's rows per step depend on the world size (exactly once per epoch still holds).
The loader state (batch count, and per source its epoch and rank row count) is the same on every rank:
saving rank 0's `state_dict()` is enough to resume all ranks. Labels are inputs shifted by one; PAD labels are
-100. A background thread prepares `prefetch` batches ahead; it is stopped at interpreter exit, so a
program may end without calling `close()`.

State versions: 3 deals micro-batches as above. A version-2 state (rank r's k-th ROW was position
r + world_size * k) still resumes: its epoch and row counts carry over unchanged. At micro_batch_size 1 the
two versions give the same order, so such a resume is exact; at a larger micro_batch_size the rest of the
resumed epoch follows the new dealing, so within that epoch some rows may be seen twice and others not at
all; every later epoch is exactly once again.
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recpre.data.documents import document_ids
from recpre.data.packed import PackedFile, open_packed, parquet_files
from recpre.errors import UserError
from recpre.ops import IGNORE_INDEX

STATE_VERSION = 3  # 3: global micro-batches dealt to ranks; 2: rows dealt to ranks (still resumable)
RESUMABLE_VERSIONS = (2, 3)
WINDOW_TOKENS = 1 << 26  # rows held at world size 1 (256 MB as int32); a rank holds 1 / world_size of it
LANES = 128  # stripes per window (a power of two): reads stay local for world sizes dividing LANES
MIN_LANE_ROWS = 64
MIX_BLOCK = 256  # mixture draws are made for this many batches at once
_END = object()


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


class _Source:
    """All row groups of one source's files, in a fixed order (files sorted, groups in file order)."""

    def __init__(self, name: str, files: list[PackedFile]):
        self.name = name
        self.files = files
        self.group_file = np.array([i for i, f in enumerate(files) for _ in f.group_rows], dtype=np.int64)
        self.group_index = np.array([g for f in files for g in range(len(f.group_rows))], dtype=np.int64)
        self.group_rows = np.array([n for f in files for n in f.group_rows], dtype=np.int64)
        self.num_rows = int(self.group_rows.sum())

    def gather(self, order: np.ndarray, ends: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, index): the row groups holding `positions` of the stream `order`, each read once and
        concatenated in stream order, and where each position's row lies in them (ends = cumsum of sizes)."""
        slots = np.searchsorted(ends, positions, side="right")
        touched, inverse = np.unique(slots, return_inverse=True)
        sizes = self.group_rows[order[touched]]
        base = np.cumsum(sizes) - sizes  # where each touched group starts in the buffer
        index = base[inverse] + (positions - (ends[slots] - self.group_rows[order[slots]]))
        rows: np.ndarray | None = None
        for j, at, n in zip(touched, base, sizes):
            g = order[j]
            piece = self.files[self.group_file[g]].read_group(int(self.group_index[g]))
            if len(touched) == 1:
                return piece, index
            if rows is None:  # filled group by group: no second window-sized copy from a concatenate
                rows = np.empty((int(sizes.sum()), piece.shape[1]), dtype=piece.dtype)
            rows[at : at + n] = piece
        return rows, index


class _Stream:
    """One rank's view of one source's epoch order: its epoch, its row count `pos`, and the current window.

    Rank r's i-th row of an epoch is row i % mb of global micro-batch r + world_size * (i // mb). For the window
    holding that row's position, the rank maps all its positions in the window through the window's lane order
    to stream positions, reads the row groups they touch once, and gathers a batch's rows from them by a small
    per-batch take.
    """

    def __init__(self, source: _Source, sid: int, seed: int, rank: int, world_size: int, micro: int, window: int):
        self.source, self.sid, self.seed, self.rank, self.world, self.micro = source, sid, seed, rank, world_size, micro
        self.usable = source.num_rows // (world_size * micro) * (world_size * micro)
        self.per_rank = self.usable // world_size
        self.window = window
        self.epoch = 0
        self.pos = 0
        self._rows: np.ndarray | None = None
        self._index: np.ndarray | None = None
        self._first = 0  # the rank's row count at the first of its positions in the loaded window
        self._key: tuple[int, int] = (-1, -1)
        self._order_epoch = -1

    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order_epoch != self.epoch:
            order = _rng(self.seed, 0, self.sid, self.epoch).permutation(len(self.source.group_rows))
            self._order_cache = (order, np.cumsum(self.source.group_rows[order]))
            self._order_epoch = self.epoch
        return self._order_cache

    def _position(self, i: np.ndarray | int) -> np.ndarray | int:
        """Global position of the rank's i-th row of the epoch."""
        return (self.rank + self.world * (i // self.micro)) * self.micro + i % self.micro

    def _count_before(self, position: int) -> int:
        """How many of the rank's rows lie at global positions below `position`."""
        g, j = divmod(position, self.micro)
        whole = max(0, -(-(g - self.rank) // self.world))  # the rank's micro-batches among 0 .. g-1
        return whole * self.micro + (j if g % self.world == self.rank else 0)

    def _load_window(self) -> int:
        w = self._position(self.pos) // self.window
        if self._key != (self.epoch, w):
            self._rows = self._index = None  # let the old window go before reading the next
            lo = w * self.window
            size = min(self.window, self.source.num_rows - lo)
            first = self._count_before(lo)
            last = self._count_before(min(lo + size, self.usable))
            mine = self._position(np.arange(first, last, dtype=np.int64)) - lo
            order, ends = self._order()
            self._rows, self._index = self.source.gather(order, ends, lo + self._striped(mine, size, w))
            self._first = first
            self._key = (self.epoch, w)
        return self._first

    def _striped(self, q: np.ndarray, size: int, w: int) -> np.ndarray:
        """Window-relative stream rows at window positions q: the window's `size` rows are cut into `lanes`
        contiguous lanes, and chunk c (positions [c * mb, (c + 1) * mb)) takes rows (c // lanes) * mb + j, in a
        per-lane random order, of lane c % lanes.

        A micro-batch so draws its rows at random from one lane, consecutive micro-batches from different lanes
        (different row groups), while a rank's micro-batches (one residue modulo world_size) fall in
        lanes / gcd(lanes, world_size) lanes, which it uses in full when world_size divides lanes: it then reads
        about 1.5x the rows it needs (lane edges cut row groups). Lanes keep at least max(MIN_LANE_ROWS, mb) rows
        so that small data is still shuffled row by row. At mb = 1 this is the version-2 order.
        """
        mb = self.micro
        lanes = 1 << (max(1, min(LANES, size // max(MIN_LANE_ROWS, mb))).bit_length() - 1)  # a power of two
        chunks = -(-size // mb)
        last_lane, short = (chunks - 1) % lanes, chunks * mb - size  # the last chunk may hold fewer rows
        lane_ids = np.arange(lanes)
        lane_rows = (chunks - lane_ids + lanes - 1) // lanes * mb - np.where(lane_ids == last_lane, short, 0)
        lane_start = np.cumsum(lane_rows) - lane_rows
        chunk, j = q // mb, q % mb
        lane, local = chunk % lanes, chunk // lanes * mb + j
        out = np.empty_like(q)
        for ln in np.unique(lane):
            sel = lane == ln
            perm = _rng(self.seed, 1, self.sid, self.epoch, w, ln).permutation(int(lane_rows[ln]))
            out[sel] = lane_start[ln] + perm[local[sel]]
        return out

    def take(self, n: int) -> np.ndarray:
        """The next n rows of this rank's epoch order (crossing into the next epoch if needed)."""
        pieces = []
        while n:
            first = self._load_window()
            off = self.pos - first
            k = min(n, len(self._index) - off)
            pieces.append(np.take(self._rows, self._index[off : off + k], axis=0))
            self.pos += k
            n -= k
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def check_enough_rows(name: str, rows: int, world_size: int, micro_batch_size: int, role: str = "train") -> None:
    """Every rank needs one whole micro-batch per epoch; otherwise one sentence naming what to change."""
    need = world_size * micro_batch_size
    if rows >= need:
        return
    fits = rows // world_size
    if role == "validation":
        smaller = f"set eval.micro_batch_size={fits}, " if fits else ""
        raise UserError(
            f"validation data {name} has {rows} rows, fewer than world_size x eval micro_batch_size = {world_size} "
            f"x {micro_batch_size} = {need} (one micro-batch per process); {smaller}split off more rows "
            f"(scripts/shuffle.py --min-val-rows {need}), or set eval.interval=0 to train without validation"
        )
    smaller = f"set train.micro_batch_size={fits} (train.world_batch_size a multiple of it) or " if fits else ""
    raise UserError(
        f"training data {name} has {rows} rows, fewer than world_size x micro_batch_size = {world_size} x "
        f"{micro_batch_size} = {need} (one micro-batch per process); {smaller}add data"
    )


class PackedLoader:
    """Iterable of (input_ids, labels) int64 [micro_batch_size, block_size]; see the module docstring.

    num_epochs: stop after that many epochs (of the least-advanced source); None = endless.
    prefetch: batches prepared ahead by a background thread (0 = none).
    role: "train" or "validation"; names the settings to change when a source is too small.
    """

    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path,
        *,
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        eos_id: int | None = None,
        num_epochs: int | None = None,
        prefetch: int = 4,
        role: str = "train",
        loss_on: str = "assistant",
    ):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise UserError("no data paths given; set data.train (or leave it empty for the embedded corpus)")
        if micro_batch_size < 1 or block_size < 1:
            raise UserError(f"micro_batch_size {micro_batch_size} and block_size {block_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.block_size, self.micro_batch_size = block_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_epochs, self.prefetch = num_epochs, prefetch
        self.paths = [str(p) for p in paths]

        opened = [[open_packed(f, block_size) for f in parquet_files(p)] for p in paths]
        if weights is None:
            self.sources = [_Source(", ".join(self.paths), [f for files in opened for f in files])]
            self.weights = None
        else:
            weights = [float(w) for w in weights]
            if len(weights) != len(paths):
                raise UserError(f"data.weights has {len(weights)} values for {len(paths)} sources; give one per source")
            if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise UserError(f"data.weights {weights} must be >= 0 with a positive sum")
            self.sources = [_Source(p, files) for p, files in zip(self.paths, opened)]
            self.weights = weights
            self._p = np.array(weights) / sum(weights)
        for src in self.sources:
            check_enough_rows(src.name, src.num_rows, world_size, micro_batch_size, role)
        metas = [f.meta for files in opened for f in files]
        file_eos = _agreed(metas, "eos_id", self.paths)
        boundary = _agreed(metas, "boundary_id", self.paths)  # chat files: PAD ends a conversation
        self.eos_id = eos_id if eos_id is not None else (boundary if boundary is not None else file_eos)
        self.pad_id = _agreed(metas, "pad_id", self.paths)
        self._context_flag = _agreed(metas, "context_flag", self.paths)  # see recpre.data.chat
        self._context_targets = loss_on == "all"
        vocab = [m.get("vocab_size") for m in metas if m.get("vocab_size") is not None]
        self.vocab_size: int | None = max(vocab) if vocab else None
        self.num_rows = sum(s.num_rows for s in self.sources)

        # rows, a whole number of micro-batches; independent of the world size
        self.window = max(1, WINDOW_TOKENS // (block_size + 1) // micro_batch_size) * micro_batch_size
        self._mask_id = self.pad_id if self.pad_id is not None and self.pad_id != file_eos else None
        self._streams = [
            _Stream(s, i, seed, rank, world_size, micro_batch_size, self.window) for i, s in enumerate(self.sources)
        ]
        self.batches_per_epoch: int | None = (
            self._streams[0].per_rank // micro_batch_size if self.weights is None else None
        )
        self._mix_block = -1
        self._state = self._snapshot(0)
        self._queue: queue.Queue | None = None
        self._ready: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = False

    # ---- state -------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "block_size": self.block_size,
            "window": self.window,
            "num_rows": [s.num_rows for s in self.sources],
            "weights": self.weights,
        }

    def _snapshot(self, batches: int) -> dict:
        return {
            "batches": batches,
            "epochs": [s.epoch for s in self._streams],
            "positions": [s.pos for s in self._streams],
        }

    def state_dict(self) -> dict:
        """Plain python types; identical on all ranks (rank 0's copy resumes every rank)."""
        return {
            **self._fingerprint(),
            **self._state,
            "epochs": list(self._state["epochs"]),
            "positions": list(self._state["positions"]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; a version-2 state resumes too (see the module docstring for what changes)."""
        mine = self._fingerprint()
        if state.get("version") not in RESUMABLE_VERSIONS:
            raise UserError(
                f"loader state has format version {state.get('version')!r} but this loader reads versions "
                f"{', '.join(map(str, RESUMABLE_VERSIONS))}: the data order changed between versions, so this data "
                "position cannot be resumed; resume with the recpre version that saved it, or start a new run with "
                "run.init_from=<checkpoint>"
            )
        if state["version"] != STATE_VERSION:  # an older dealing: its window had no micro-batch alignment
            mine = {k: v for k, v in mine.items() if k not in ("version", "window")}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(
                    f"loader state was saved with {key}={state.get(key)!r} but this run has {value!r}; "
                    "resume with the same data, seed, world size and batch size (the data order depends on them)"
                )
        self._shutdown()
        for s, epoch, pos in zip(self._streams, state["epochs"], state["positions"]):
            s.epoch, s.pos = int(epoch), int(pos)
        self._state = self._snapshot(int(state["batches"]))
        self._done = False

    def load_state_dict_from_world(self, state: dict, saved_world_size: int) -> None:
        """Resume a position saved at another world size: the same global micro-batch, dealt to this world size.

        Exact for one unweighted source (a mixture draws its sources per rank batch) at a position whole over this
        world size, within the first epoch (its order is the same at every world size up to where each stops) or
        when the usable rows per epoch are the same at both world sizes; refused otherwise."""
        world, mb = self.world_size, self.micro_batch_size
        stream = self._streams[0]
        saved_usable = stream.source.num_rows // (saved_world_size * mb) * (saved_world_size * mb)
        global_batches = int(state.get("batches", 0)) * saved_world_size
        global_rows = [int(pos) * saved_world_size for pos in state.get("positions", [])]
        why = None
        if self.weights is not None or len(self._streams) != 1:
            why = "a data mixture draws its sources per rank batch, so its order depends on the world size"
        elif saved_usable != stream.usable and (
            any(int(e) for e in state.get("epochs", [])) or global_rows[0] >= stream.usable
        ):
            why = (
                f"the source's {stream.source.num_rows} rows give {saved_usable} usable rows per epoch at "
                f"{saved_world_size} ranks but {stream.usable} at {world}"
            )
        elif global_batches % world or any(r % (world * mb) for r in global_rows):
            why = f"its position ({global_batches} global micro-batches) is not a whole number of {world}-rank steps"
        if why is not None:
            raise UserError(
                f"the data position saved by {saved_world_size} ranks cannot be continued exactly by {world}: {why}; "
                f"resume with {saved_world_size} ranks"
            )
        converted = dict(state, world_size=world, batches=global_batches // world)
        converted["positions"] = [r // world for r in global_rows]
        self.load_state_dict(converted)

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (e.g. to run the same validation batches again)."""
        self._shutdown()
        for s in self._streams:
            s.epoch, s.pos = 0, 0
        self._state = self._snapshot(0)
        self._done = False

    @property
    def epoch(self) -> int:
        """Completed epochs (for mixtures: of the least-advanced source) as seen by the consumer."""
        return min(self._state["epochs"])

    @property
    def step(self) -> int:
        """Batches consumed so far."""
        return self._state["batches"]

    def global_batch_index(self, k: int | None = None) -> int:
        """Run-wide index, shared by all ranks, of this rank's k-th batch (default: the last one returned).

        rank + world_size * k: the global micro-batch of the module docstring. For one source at a fixed
        micro_batch_size it names the same rows whatever the world size; seed per-micro-batch draws with it.
        """
        k = self.step - 1 if k is None else k
        if k < 0:
            raise ValueError("no batch has been taken yet; pass k")
        return self.rank + self.world_size * k

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a weighted mixture has no fixed number of batches per epoch")
        return self.batches_per_epoch

    def document_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.eos_id is None:
            raise UserError(f"data {', '.join(self.paths)} records no eos_id; pass eos_id to the loader")
        return document_ids(input_ids, self.eos_id)

    # ---- production --------------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.num_epochs is not None and min(s.epoch for s in self._streams) >= self.num_epochs

    def _choices(self, t: int) -> np.ndarray:
        """Source of each row of batch t: drawn per block of MIX_BLOCK batches, a pure function of (seed, t)."""
        block = t // MIX_BLOCK
        if self._mix_block != block:
            rng = _rng(self.seed, 2, block)
            self._mix = rng.choice(len(self._streams), size=(MIX_BLOCK, self.micro_batch_size), p=self._p)
            self._mix_block = block
        return self._mix[t % MIX_BLOCK]

    def _produce(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        mb = self.micro_batch_size
        if self.weights is None:
            rows = self._streams[0].take(mb)
        else:
            choice = self._choices(t)
            if (choice == choice[0]).all():  # one source for the whole batch (always when mb == 1)
                rows = self._streams[int(choice[0])].take(mb)
            else:
                rows = np.empty((mb, self.block_size + 1), dtype=np.int64)
                for sid, stream in enumerate(self._streams):
                    idx = np.flatnonzero(choice == sid)
                    if len(idx):
                        rows[idx] = stream.take(len(idx))
        rows_t = torch.from_numpy(rows)
        context = None
        if self._context_flag is not None:
            flagged = (rows_t & self._context_flag) != 0
            rows_t = rows_t & ~self._context_flag
            context = None if self._context_targets else flagged[:, 1:]
        inputs = torch.empty((mb, self.block_size), dtype=torch.int64)
        labels = torch.empty((mb, self.block_size), dtype=torch.int64)
        inputs.copy_(rows_t[:, :-1])
        labels.copy_(rows_t[:, 1:])
        if self._mask_id is not None:
            labels.masked_fill_(labels == self._mask_id, IGNORE_INDEX)
        if context is not None:  # loss_on: assistant: context tokens are conditioned on, never scored
            labels.masked_fill_(context, IGNORE_INDEX)
        return inputs, labels

    def _next_item(self):
        if self._finished():
            return _END
        t = self._state_batches_produced
        batch = self._produce(t)
        self._state_batches_produced = t + 1
        return batch, self._snapshot(t + 1)

    @staticmethod
    def _worker(ref: weakref.ref, q: queue.Queue, stop: threading.Event, group: int) -> None:
        """Producer loop: puts lists of up to `group` (batch, state) items, ending with _END or an exception.

        Handing batches over in groups cuts the thread hand-offs (each costs a GIL round trip). The loader is
        held only weakly between groups, so a dropped loader ends its thread.
        """
        while not stop.is_set():
            loader = ref()
            if loader is None:
                return
            items: list = []
            try:
                while len(items) < group and not stop.is_set():
                    items.append(loader._next_item())
                    if items[-1] is _END:
                        break
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                items.append(err)
            del loader
            while not stop.is_set():
                try:
                    q.put(items, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not items or items[-1] is _END or isinstance(items[-1], BaseException):
                return

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():  # __del__ may run on the producer thread
                self._thread.join()
            self._thread = None
        self._queue = None
        self._ready.clear()
        # The producer ran ahead: rewind every stream to the consumer's position.
        for s, epoch, pos in zip(self._streams, self._state["epochs"], self._state["positions"]):
            s.epoch, s.pos = epoch, pos

    def close(self) -> None:
        self._shutdown()

    def __iter__(self) -> PackedLoader:
        return self

    def _start_thread(self) -> None:
        group = max(1, min(self.prefetch, (1 << 18) // (self.micro_batch_size * self.block_size)))
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch // group))
        self._ready.clear()
        self._state_batches_produced = self._state["batches"]
        self._thread = threading.Thread(
            target=self._worker,
            args=(weakref.ref(self), self._queue, self._stop, group),
            name="recpre-data-prefetch",
            daemon=True,
        )
        self._thread.start()
        _RUNNING.add(self)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        if self.prefetch <= 0:
            self._state_batches_produced = self._state["batches"]
            item = self._next_item()
        else:
            if not self._ready:
                if self._thread is None:
                    self._start_thread()
                self._ready.extend(self._queue.get())
            item = self._ready.popleft()
            if isinstance(item, BaseException):
                self._shutdown()
                raise item
        if item is _END:
            self._done = True
            self._shutdown()
            raise StopIteration
        batch, self._state = item
        return batch

    def __del__(self):
        try:  # noqa: SIM105 - at interpreter shutdown, module globals such as contextlib may already be None
            self._shutdown()
        except Exception:  # noqa: BLE001
            pass


_RUNNING: weakref.WeakSet[PackedLoader] = weakref.WeakSet()


@atexit.register
def _stop_readers() -> None:
    """Join every prefetch thread before the interpreter finalizes: a daemon thread still inside torch or
    pyarrow code when their thread pools are torn down aborts the process (`terminate called without an
    active exception`, exit code 134)."""
    for loader in list(_RUNNING):
        loader.close()


def _agreed(metas: list[dict], key: str, paths: list[str]) -> int | None:
    values = {m[key] for m in metas if m.get(key) is not None}
    if len(values) > 1:
        raise UserError(f"data {', '.join(paths)} mixes files with different {key} {sorted(values)}; use one tokenizer")
    return values.pop() if values else None
