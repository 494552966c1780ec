"""PackedLoader: packed parquet rows -> (input_ids, labels) batches for one rank, exactly once per epoch.

Order of one epoch of one source (the same computation on every rank, from `seed` and the epoch):
  1. the source's row groups (over all its files) are permuted;
  2. that row-group order defines a stream of N rows; rank r owns the contiguous slice
     [r * P, (r + 1) * P) with P = (N // world_size) // micro_batch_size * micro_batch_size;
  3. the slice is cut into windows of `window` rows (a multiple of micro_batch_size, ~8M tokens);
     rows inside each window are permuted, and batches are consecutive runs of micro_batch_size rows.
So every row is read at most once per epoch, by one rank, and every rank yields exactly P / micro_batch_size
batches: ranks never disagree on the batch count (a disagreement would hang DDP). The leftover
N - world_size * P rows (fewer than world_size * micro_batch_size) are skipped in that epoch; since the
row-group order changes each epoch, different rows are skipped each time. With N divisible by
world_size * micro_batch_size, the union over ranks of an epoch is exactly the dataset.

Several paths without weights are one dataset. With `weights`, each path is a source; every row of a batch
picks its source with those probabilities, from a generator seeded by (seed, batch index) and identical on
all ranks, so ranks stay in lockstep and each source keeps its own per-rank partition and epochs.
The loader state (batch count, and per source its epoch and position) is therefore the same on every rank:
saving rank 0's `state_dict()` is enough to resume all ranks. Labels are inputs shifted by one; PAD labels are
-100. A background thread prepares `prefetch` batches ahead.
"""

from __future__ import annotations

import collections
import contextlib
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

STATE_VERSION = 1
WINDOW_TOKENS = 1 << 23
IGNORE_INDEX = -100
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

    def read(self, order: np.ndarray, ends: np.ndarray, a: int, b: int) -> np.ndarray:
        """Rows at stream positions [a, b) of the row-group order `order` (ends = cumsum of its sizes)."""
        pieces = []
        j = int(np.searchsorted(ends, a, side="right"))
        while a < b:
            g = order[j]
            start = int(ends[j] - self.group_rows[g])
            rows = self.files[self.group_file[g]].read_group(int(self.group_index[g]))
            lo, hi = a - start, min(b, int(ends[j])) - start
            pieces.append(rows[lo:hi])
            a = start + hi
            j += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class _Stream:
    """One rank's view of one source: its epoch, its position in its slice, and the current window.

    A window is read once (whole row groups, contiguous); its row permutation is applied per batch by a
    small gather, which stays in cache (a window-wide permuted copy costs a full extra pass over memory).
    """

    def __init__(self, source: _Source, sid: int, seed: int, rank: int, world_size: int, micro: int, window: int):
        self.source, self.sid, self.seed, self.rank = source, sid, seed, rank
        self.per_rank = (source.num_rows // world_size) // micro * micro
        self.window = window
        self.epoch = 0
        self.pos = 0
        self._rows: np.ndarray | None = None
        self._perm: np.ndarray | None = None
        self._key: tuple[int, int] = (-1, -1)
        self._order_epoch = -1

    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order_epoch != self.epoch:
            order = _rng(self.seed, 0, self.sid, self.epoch).permutation(len(self.source.group_rows))
            self._order_cache = (order, np.cumsum(self.source.group_rows[order]))
            self._order_epoch = self.epoch
        return self._order_cache

    def _load_window(self) -> int:
        k = self.pos // self.window
        if self._key != (self.epoch, k):
            self._rows = None  # let the old window go before reading the next
            lo, hi = k * self.window, min((k + 1) * self.window, self.per_rank)
            order, ends = self._order()
            base = self.rank * self.per_rank
            self._rows = self.source.read(order, ends, base + lo, base + hi)
            self._perm = _rng(self.seed, 1, self.sid, self.epoch, self.rank, k).permutation(hi - lo)
            self._key = (self.epoch, k)
        return k * self.window

    def take(self, n: int) -> np.ndarray:
        """The next n rows of this rank's epoch order (crossing into the next epoch if needed)."""
        pieces = []
        while n:
            start = self._load_window()
            off = self.pos - start
            k = min(n, len(self._perm) - off)
            pieces.append(np.take(self._rows, self._perm[off : off + k], axis=0))
            self.pos += k
            n -= k
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class PackedLoader:
    """Iterable of (input_ids, labels) int64 [micro_batch_size, block_size]; see the module docstring.

    num_epochs: stop after that many epochs (of the least-advanced source); None = endless.
    prefetch: batches prepared ahead by a background thread (0 = none).
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
            need = world_size * micro_batch_size
            if src.num_rows < need:
                raise UserError(
                    f"data source {src.name} has {src.num_rows} rows, fewer than world_size x micro_batch_size = "
                    f"{need}; add data or lower train.micro_batch_size"
                )
        metas = [f.meta for files in opened for f in files]
        self.eos_id = eos_id if eos_id is not None else _agreed(metas, "eos_id", self.paths)
        self.pad_id = _agreed(metas, "pad_id", self.paths)
        vocab = [m.get("vocab_size") for m in metas if m.get("vocab_size") is not None]
        self.vocab_size: int | None = max(vocab) if vocab else None
        self.num_rows = sum(s.num_rows for s in self.sources)

        row_tokens = (block_size + 1) * micro_batch_size
        self.window = max(1, WINDOW_TOKENS // row_tokens) * micro_batch_size
        self._mask_id = self.pad_id if self.pad_id is not None and self.pad_id != self.eos_id else None
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
        mine = self._fingerprint()
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
        inputs = torch.empty((mb, self.block_size), dtype=torch.int64)
        labels = torch.empty((mb, self.block_size), dtype=torch.int64)
        inputs.copy_(rows_t[:, :-1])
        labels.copy_(rows_t[:, 1:])
        if self._mask_id is not None:
            labels.masked_fill_(labels == self._mask_id, IGNORE_INDEX)
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
                while len(items) < group:
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
            if items[-1] is _END or isinstance(items[-1], BaseException):
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
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._shutdown()


def _agreed(metas: list[dict], key: str, paths: list[str]) -> int | None:
    values = {m[key] for m in metas if m.get(key) is not None}
    if len(values) > 1:
        raise UserError(f"data {', '.join(paths)} mixes files with different {key} {sorted(values)}; use one tokenizer")
    return values.pop() if values else None
