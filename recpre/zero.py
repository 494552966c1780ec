"""Optimizer sharding for simple-ddp (ZeRO-1): each rank keeps the optimizer state of 1/N of the parameters.

Weights and gradients stay whole on every rank; only the optimizer state (two moments: 8 of the 16 bytes per
parameter of mixed-precision Adam) is divided. One optimizer step:

1. gradients are reduce-scattered through the fabric's chunk stream: slice r of every chunk is averaged onto rank r
   (inside the shard group, then across the replica groups when the state is sharded per node);
2. the global gradient norm is the root of the all-reduced sums of squares of the slices each rank owns;
3. each rank's optimizer updates its slices in place (they are views of the model's parameters);
4. the updated slices are all-gathered through the same stream, so every rank ends with the same weights.

Adam-family optimizers own flat ranges balanced by bytes (the chunk slices). Muon orthogonalises whole matrices,
so under Muon every parameter is owned whole by one rank (greedy by bytes; the imbalance is reported), its
gradients are all-reduced and each updated parameter is broadcast from its owner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recpre.optim import ELLISAdam, MuonAdamW, load_optimizer_state


def balance_whole(sizes: list[int], parts: int) -> list[int]:
    """Owner rank of each item: largest first to the least-loaded rank (ties: lowest rank), deterministic."""
    load = [0] * parts
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(parts), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ZeroOptimizer:
    """The run's optimizer restricted to this rank's part of the parameters, with the collectives around its step.

    The wrapped optimizer's groups keep their hyperparameters (the schedule sets `lr` on them as before); their
    `params` become this rank's shard parameters. `state_dict` is this rank's part; `full_state_dict` gathers the
    format a single process writes.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        *,
        stream_factory: Callable[[int], Any],
        rank: int,
        shard_size: int,
        world_size: int,
        group: Any = None,
        replicas: Any = None,
        all_reduce_gradients: Callable[[], None] | None = None,
    ) -> None:
        self.inner = optimizer
        self.params = params
        self.rank, self.shard_size, self.world_size = rank, shard_size, world_size
        self.group, self.replicas = group, replicas
        self.whole = isinstance(optimizer, MuonAdamW)
        self._all_reduce = all_reduce_gradients
        index = {id(p): i for i, p in enumerate(params)}
        full_groups = [[index[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        if len({i for g in full_groups for i in g}) != len(params):
            raise ValueError("the optimizer must hold exactly the model's trainable parameters")
        self.stream = None
        if self.whole:
            sizes = [p.numel() * p.element_size() for p in params]
            self.owners = balance_whole(sizes, shard_size)
            pieces = [(i, 0, params[i].numel()) for i in range(len(params)) if self.owners[i] == rank]
            shard_params = [params[i] for i, _, _ in pieces]
        else:
            self.stream = stream_factory(shard_size)
            pieces = [(pc.index, pc.src, pc.length) for pc in self.stream.owned(rank)]
            pieces.sort(key=lambda x: (x[0], x[1]))
            with torch.no_grad():
                shard_params = [nn.Parameter(params[i].view(-1).narrow(0, a, n)) for i, a, n in pieces]
        self.pieces = pieces
        self.shards = shard_params
        self._piece_of = {id(s): k for k, s in enumerate(shard_params)}
        self.full_groups = full_groups
        for g, members in zip(optimizer.param_groups, full_groups):
            keep = set(members)
            g["params"] = [s for s, (i, _, _) in zip(shard_params, pieces) if i in keep]
        if isinstance(optimizer, ELLISAdam):
            optimizer.shard_norms = self._tensor_norms

    # -- what the driver touches ----------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            p.grad = None

    def reduce_gradients(self) -> None:
        """Average the gradients this rank's optimizer needs (all of them under Muon, its slices otherwise)."""
        if self.whole:
            self._all_reduce()
            return
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in self.params], device=self.stream.device)
        dist.all_reduce(present)
        flags = [bool(x) for x in present.tolist()]
        self.stream.reduce_scatter(self.rank, self.world_size, flags, group=self.group, replicas=self.replicas)
        for shard, (i, a, n) in zip(self.shards, self.pieces):
            grad = self.params[i].grad
            shard.grad = None if grad is None or not flags[i] else grad.view(-1).narrow(0, a, n)

    def clip_grad_norm(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the whole model, from the slices each rank owns."""
        grads = [s.grad for s in self.shards if s.grad is not None]
        device = self.params[0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return float(total)

    def step(self, closure: Callable | None = None) -> Any:
        """Update this rank's part, then share it: afterwards every rank holds the same full weights."""
        loss = self.inner.step(closure)
        with torch.no_grad():
            if self.stream is not None:
                self.stream.all_gather(self.rank, group=self.group)
            else:
                for i, p in enumerate(self.params):
                    dist.broadcast(p.data, group=self.group, group_src=self.owners[i])
        return loss

    def imbalance(self) -> float:
        """Largest rank's share of the parameters this optimizer updates, relative to 1/N (1.0 = balanced)."""
        load = [0] * self.shard_size
        if self.whole:
            for i, p in enumerate(self.params):
                load[self.owners[i]] += p.numel() * p.element_size()
        else:
            for r in range(self.shard_size):
                load[r] = sum(pc.length for pc in self.stream.owned(r))
        return max(load) * self.shard_size / max(sum(load), 1)

    # -- checkpoints in the single-process format ---------------------------------------------------------

    def full_state_dict(self, is_main: bool) -> dict[str, Any] | None:
        """The optimizer state a single process would hold, assembled on rank 0 (None elsewhere). Collective."""
        local = self.inner.state
        scalars: dict[int, dict[str, Any]] = {}
        tensor_keys: dict[int, dict[str, torch.dtype]] = {}
        for shard, (i, _, n) in zip(self.shards, self.pieces):
            for key, value in local.get(shard, {}).items():
                if torch.is_tensor(value) and value.numel() == n and value.dim() > 0:
                    tensor_keys.setdefault(i, {})[key] = value.dtype
                else:
                    scalars.setdefault(i, {})[key] = value.detach().cpu() if torch.is_tensor(value) else value
        schema: list[Any] = [None] * self.shard_size
        dist.all_gather_object(schema, (scalars, tensor_keys), group=self.group)
        merged_scalars: dict[int, dict[str, Any]] = {}
        merged_keys: dict[int, dict[str, torch.dtype]] = {}
        for s, k in schema:
            for i, v in s.items():
                merged_scalars.setdefault(i, {}).update(v)
            for i, v in k.items():
                merged_keys.setdefault(i, {}).update(v)
        mine: dict[int, list[tuple[nn.Parameter, int, int]]] = {}
        for shard, (i, a, n) in zip(self.shards, self.pieces):
            mine.setdefault(i, []).append((shard, a, n))
        state: dict[int, dict[str, Any]] = {}
        for i in sorted(set(merged_scalars) | set(merged_keys)):
            entry = dict(merged_scalars.get(i, {}))
            p = self.params[i]
            for key, dtype in sorted(merged_keys.get(i, {}).items()):
                flat = torch.zeros(p.numel(), dtype=dtype, device=p.device)
                for shard, a, n in mine.get(i, []):
                    flat[a : a + n].copy_(local[shard][key].view(-1))
                dist.reduce(flat, group=self.group, group_dst=0)
                entry[key] = flat.view(p.shape).cpu() if is_main else None
            state[i] = entry
        if not is_main:
            return None
        groups = self.inner.state_dict()["param_groups"]
        position = {i: k for k, i in enumerate(i for members in self.full_groups for i in members)}
        out_groups = [dict(g, params=[position[i] for i in members]) for g, members in zip(groups, self.full_groups)]
        return {"state": {position[i]: v for i, v in state.items()}, "param_groups": out_groups}

    def sharded_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """This rank's slices for a sharded checkpoint, keyed `POSITION/KEY@OFFSET` (flat, in the single-process
        parameter order, so any world size reassembles them), and on rank 0 the rest (scalars, shapes, groups)
        a single process would hold (None elsewhere). Collective over the shard group."""
        position = {i: k for k, i in enumerate(i for members in self.full_groups for i in members)}
        local = self.inner.state
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[int, dict[str, Any]] = {}
        for shard, (i, a, n) in zip(self.shards, self.pieces):
            for key, value in local.get(shard, {}).items():
                if torch.is_tensor(value) and value.numel() == n and value.dim() > 0:
                    tensors[f"{position[i]}/{key}@{a}"] = value.detach().reshape(-1)
                else:
                    scalars.setdefault(position[i], {})[key] = value.detach().cpu() if torch.is_tensor(value) else value
        gathered: list[Any] = [None] * self.shard_size
        dist.all_gather_object(gathered, scalars, group=self.group)
        if self.rank != 0:
            return tensors, None
        merged: dict[int, dict[str, Any]] = {}
        for part in gathered:
            for k, v in part.items():
                merged.setdefault(k, {}).update(v)
        groups = self.inner.state_dict()["param_groups"]
        out_groups = [dict(g, params=[position[i] for i in members]) for g, members in zip(groups, self.full_groups)]
        shapes = {position[i]: list(p.shape) for i, p in enumerate(self.params)}
        return tensors, {"state": merged, "shapes": shapes, "param_groups": out_groups}

    def load_full_state_dict(self, saved: dict[str, Any], *, source: str) -> None:
        """Take this rank's slices of a single-process optimizer state (hyperparameters stay this run's)."""
        order = [i for members in self.full_groups for i in members]
        full_state = {order[k]: v for k, v in saved["state"].items()}
        local_state: dict[int, dict[str, Any]] = {}
        local_groups = []
        k = 0
        for g, members in zip(saved["param_groups"], self.full_groups):
            ids = []
            keep = set(members)
            for shard, (i, a, n) in zip(self.shards, self.pieces):
                if i not in keep:
                    continue
                if i in full_state:
                    local_state[k] = {
                        key: v.reshape(-1)[a : a + n].clone().view(shard.shape) if self._is_elementwise(v, i) else v
                        for key, v in full_state[i].items()
                    }
                ids.append(k)
                k += 1
            local_groups.append(dict(g, params=ids))
        load_optimizer_state(self.inner, {"state": local_state, "param_groups": local_groups}, source=source)

    def _is_elementwise(self, value: Any, i: int) -> bool:
        return torch.is_tensor(value) and value.dim() > 0 and value.numel() == self.params[i].numel()

    # -- ELLISAdam's per-tensor update clipping over pieces on several ranks ------------------------------

    def _tensor_norms(self, group: dict, shards: list[torch.Tensor], norms: list[torch.Tensor]):
        """Whole-tensor norms of g / sqrt(v) from the pieces' norms (a collective: every rank calls it)."""
        g = next(k for k, grp in enumerate(self.inner.param_groups) if grp is group)
        members = self.full_groups[g]
        slot = {i: k for k, i in enumerate(members)}
        sq = torch.zeros(max(len(members), 1), dtype=torch.float32, device=self.params[0].device)
        for shard, nrm in zip(shards, norms):
            sq[slot[self.pieces[self._piece_of[id(shard)]][0]]] += nrm.float() ** 2
        dist.all_reduce(sq, group=self.group)
        whole = [self.pieces[self._piece_of[id(s)]][0] for s in shards]
        return [sq[slot[i]].sqrt().to(n.dtype) for i, n in zip(whole, norms)], [self.params[i].numel() for i in whole]
