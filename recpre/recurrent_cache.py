"""KV cache for recurrent-depth decoding: entries per block application, and what stands in for missing ones.

With adaptive depth a token can stop iterating before a later token does: at recurrence step j the later token
attends to earlier tokens that never computed step j. A *lookup strategy* says which entries stand in for them.
The strategies, their names and their rules are those of the Huginn reference implementation
(`HuginnDynamicCache` in `recpre/raven_modeling_minimal.py` of github.com/seal-rg/recurrent-pretraining),
written for any shape: there, block applications are numbered globally (prelude blocks 0..P-1, core block i of
iteration j is P + j*C + i, coda blocks -1, -2, ...) and "-m4" means "the same core block" because Huginn's core
has C = 4 blocks; here P and C come from the model.

- `full`: the entries that exist for this application, no stand-ins (missing tokens are not attended to);
  `skip` is the same rule.
- `latest-m4` (recpre's default): a missing token lends the entry of the deepest iteration it computed, up to
  this one, of the same core block. `available-m4` is the same rule.
- `always-last-m4`: every earlier token lends the entry of the deepest iteration it computed at all (also
  deeper than this one), same core block.
- `randomized`: a random earlier iteration of the same core block (a sanity check; draws from torch's RNG).
- A suffix `-compress-s<N>` (or the strategy `compress-s<N>` alone) folds applications P.. onto N slots
  modulo N, `-compress-r<N>` folds N consecutive applications onto one slot, `-compress-anchor` keeps the
  first 8 iterations and folds the rest onto one iteration's slots. Later writes to a slot replace earlier ones.

`share_every=m` is recpre's bounded cache: m iterations' slots per block (`-compress-s<m*C>`).
Rows marked frozen (they stopped iterating) keep writing the entries of their last computed iteration, so a
batch gives each row the result it would get alone.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from recpre.errors import UserError
from recpre.model import KVCache

LOOKUPS = ("full", "skip", "latest-m4", "available-m4", "always-last-m4", "randomized")
ANCHOR_ITERATIONS = 8  # compress-anchor: iterations kept in their own slots (the reference's 4 * 8 applications)


def parse_lookup(name: str) -> tuple[str | None, tuple[str, int] | None]:
    """(strategy or None, (compression kind "s" | "r" | "anchor", N) or None) from a lookup name."""
    base, _, compress = name.partition("compress-")
    base = base.rstrip("-") or None
    if base is not None and base not in LOOKUPS:
        raise UserError(f"cache lookup '{name}' is unknown; choose one of {', '.join(LOOKUPS)}, optionally "
                        "followed by -compress-s<N>, -compress-r<N> or -compress-anchor")  # fmt: skip
    if not compress:
        return base, None
    if compress == "anchor":
        return base, ("anchor", 0)
    kind, digits = compress[:1], compress[1:]
    if kind not in ("s", "r") or not digits.isdigit() or int(digits) < 1:
        raise UserError(f"cache lookup '{name}': the compression must be s<N>, r<N> or anchor with N >= 1")
    return base, (kind, int(digits))


class RecurrentKVCache(KVCache):
    """KV cache with per-token presence per block application, lookup strategies and frozen rows."""

    def __init__(self, n_prelude: int, n_core: int, lookup: str = "latest-m4", share_every: int | None = None) -> None:
        super().__init__()
        if share_every is not None and share_every < 1:
            raise ValueError(f"share_every must be a positive integer, got {share_every}")
        self.n_prelude, self.n_core = n_prelude, n_core
        self.lookup, self.compression = parse_lookup(lookup)
        if share_every is not None:
            if self.compression is not None:
                raise UserError("share_every and a -compress- lookup both fold the cache; choose one")
            self.compression = ("s", share_every * n_core)
        self.present: dict[int, Tensor] = {}  # slot -> bool [tokens]: which tokens wrote this slot
        self._current: dict[int, tuple[Tensor, Tensor]] = {}  # core block -> new tokens' latest entry
        self._frozen: Tensor | None = None  # [batch] bool
        self._frozen_kv: dict[int, tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_config(cls, config, lookup: str = "latest-m4", share_every: int | None = None) -> RecurrentKVCache:
        """The cache for a recurrent model of shape `config` (a ModelConfig)."""
        return cls(config.n_layers_prelude, config.n_layers_core, lookup, share_every)

    # ---- numbering ----------------------------------------------------------------------------------------
    def application(self, key: Hashable) -> int:
        """The reference's global block index of a model cache key."""
        part, step, block = key  # type: ignore[misc]
        if part == "prelude":
            return block
        if part == "core":
            return self.n_prelude + step * self.n_core + block
        if part == "coda":
            return -(block + 1)
        raise ValueError(f"RecurrentKVCache serves recurrent models; got key {key}")

    def slot(self, index: int) -> int:
        """Where application `index` is stored after compression."""
        P, C = self.n_prelude, self.n_core
        if self.compression is None or index < P:
            return index
        kind, n = self.compression
        if kind == "s":
            return (index - P) % n + P
        if kind == "r":
            return (index - P) // n + P
        keep = ANCHOR_ITERATIONS * C
        return index if index - P < keep else P + keep + (index - P - keep) % C

    def core_slots(self) -> int:
        """Iterations' worth of core slots held per block (bounded by share_every)."""
        return len([s for s in self.keys if s >= self.n_prelude]) // self.n_core

    # ---- writing ------------------------------------------------------------------------------------------
    def update(self, key: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        is_core = key[0] == "core"  # type: ignore[index]
        if is_core and self._frozen is not None and key[2] in self._frozen_kv:  # type: ignore[index]
            fk, fv = self._frozen_kv[key[2]]  # type: ignore[index]
            keep = self._frozen[:, None, None, None]
            k, v = torch.where(keep, fk, k), torch.where(keep, fv, v)
        if is_core:
            self._current[key[2]] = (k, v)  # type: ignore[index]
        slot = self.slot(self.application(key))
        end = self.offset + k.shape[-2]
        self._write(slot, k, v, end)
        return self._read(slot, end)

    def _write(self, slot: int, k: Tensor, v: Tensor, end: int) -> None:
        start = self.offset
        if slot not in self.keys:
            shape = (*k.shape[:-2], end, k.shape[-1])
            self.keys[slot], self.values[slot] = k.new_zeros(shape), v.new_zeros(shape)
            self.present[slot] = torch.zeros(end, dtype=torch.bool)
        elif self.keys[slot].shape[-2] < end:
            grow = end - self.keys[slot].shape[-2]
            pad = (*k.shape[:-2], grow, k.shape[-1])
            self.keys[slot] = torch.cat([self.keys[slot], k.new_zeros(pad)], dim=-2)
            self.values[slot] = torch.cat([self.values[slot], v.new_zeros(pad)], dim=-2)
            self.present[slot] = torch.cat([self.present[slot], torch.zeros(grow, dtype=torch.bool)])
        self.keys[slot][..., start:end, :] = k
        self.values[slot][..., start:end, :] = v
        self.present[slot][start:end] = True

    # ---- reading ------------------------------------------------------------------------------------------
    def _read(self, slot: int, end: int) -> tuple[Tensor, Tensor]:
        present = self.present[slot][:end]
        keys, values = self.keys[slot][..., :end, :], self.values[slot][..., :end, :]
        self.kept = None
        if bool(present.all()):
            return keys, values
        if self.lookup in ("full", "skip"):
            self.kept = present.nonzero().squeeze(-1).to(keys.device)
            return keys.index_select(-2, self.kept), values.index_select(-2, self.kept)
        if self.lookup is None:
            raise ValueError(f"cache lookup needs a strategy: some tokens have no entry in slot {slot}")
        source = self._sources(slot, end)
        out_k, out_v = keys.clone(), values.clone()
        for src in sorted(set(source.tolist())):
            if src == slot:
                continue
            rows = (source == src).nonzero().squeeze(-1).to(keys.device)
            out_k[..., rows, :] = self.keys[src][..., rows, :]
            out_v[..., rows, :] = self.values[src][..., rows, :]
        return out_k, out_v

    def _sources(self, slot: int, end: int) -> Tensor:
        """The slot each token position reads from (int64 [end])."""
        P, C = self.n_prelude, self.n_core
        if slot < P:  # prelude and coda: the entry itself, else the first prelude block's (as the reference)
            return torch.where(self.present[slot][:end], slot, 0)
        same = [s for s in sorted(self.keys) if s >= P and (s - P) % C == (slot - P) % C]
        if self.lookup != "always-last-m4":
            same = [s for s in same if s <= slot]
        present = torch.stack([self._present_upto(s, end) for s in same])  # [candidates, end]
        if self.lookup == "randomized":
            return self._random_sources(same, present)
        if not bool(present.any(0).all()):
            raise ValueError(f"KV cache: some tokens have no entry for core slot {slot} or below")
        deepest = (present * torch.arange(1, len(same) + 1)[:, None]).argmax(0)
        return torch.tensor(same)[deepest]

    def _present_upto(self, s: int, end: int) -> Tensor:
        p = self.present[s][:end]
        return torch.cat([p, torch.zeros(end - p.shape[0], dtype=torch.bool)]) if p.shape[0] < end else p

    @staticmethod
    def _random_sources(same: list[int], present: Tensor) -> Tensor:
        out = []
        for pos in range(present.shape[1]):
            valid = [s for s, ok in zip(same, present[:, pos].tolist()) if ok]
            out.append(valid[int(torch.randint(len(valid), (1,)))])
        return torch.tensor(out)

    # ---- frozen rows and bookkeeping ----------------------------------------------------------------------
    def freeze(self, rows: Tensor) -> None:
        """Rows (bool [batch]) that stop iterating now: later core steps reuse their latest entries."""
        self._frozen = rows.clone()
        self._frozen_kv = dict(self._current)

    def advance(self, n: int) -> None:
        self._current.clear()
        self._frozen, self._frozen_kv = None, {}
        self.offset += n

    def reset(self) -> None:
        super().reset()
        self.present.clear()
        self._current.clear()
        self._frozen, self._frozen_kv = None, {}
