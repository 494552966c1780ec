"""Who am I in the job: rank, world size, local rank and the rendezvous address, from torchrun or SLURM variables.

Kept apart from the fabric and free of torch so that the launch environment can be unit-tested with fake
environment dictionaries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from recpre.errors import UserError

# Ports derived from a SLURM job id fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN): above the
# well-known/registered services people commonly run and below the Linux ephemeral range (32768-60999), so the
# port is neither privileged nor likely to be taken by an outgoing connection.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
DEFAULT_MASTER_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class ProcessInfo:
    """The place of this process in the job. `source` is "single", "torchrun" or "slurm"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = 0
    source: str = "single"


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as `node[01-04,07]`, `a[1-2],b3` or `rack[1-2]-gpu[01-02]` into host names.

    Zero padding of ranges is kept (`[08-10]` gives 08, 09, 10); several bracket groups in one name expand to
    their product in SLURM's order.
    """
    text = nodelist.strip()
    if not text:
        raise UserError("SLURM_JOB_NODELIST is empty; run under srun/sbatch or set MASTER_ADDR explicitly.")
    hosts: list[str] = []
    for item in _split_top_level(text, nodelist):
        hosts.extend(_expand_host(item, nodelist))
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise UserError(f"SLURM node list {original!r} has nested brackets; expected e.g. node[01-04,07].")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"SLURM node list {original!r} has an unmatched ']'.")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"SLURM node list {original!r} has an unmatched '['.")
    items.append(text[start:])
    for item in items:
        if not item.strip():
            raise UserError(f"SLURM node list {original!r} has an empty entry.")
    return [item.strip() for item in items]


_GROUP = re.compile(r"\[([^\]]*)\]")


def _expand_host(pattern: str, original: str) -> list[str]:
    match = _GROUP.search(pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[: match.start()], pattern[match.end() :]
    out = []
    for value in _expand_range_list(match.group(1), original):
        out.extend(_expand_host(prefix + value + suffix, original))
    return out


def _expand_range_list(body: str, original: str) -> list[str]:
    values = []
    for part in body.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            values.append(part)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m is None:
            raise UserError(f"SLURM node list {original!r} has a bad range {part!r}; expected e.g. 01-04.")
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise UserError(f"SLURM node list {original!r} has a decreasing range {part!r}.")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return values


def slurm_port(job_id: int) -> int:
    """A rendezvous port every task of a job derives alike, so jobs sharing a node rarely collide."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} is not an integer.") from None


def _check(rank: int, world: int, local_rank: int, names: str) -> None:
    if world < 1:
        raise UserError(f"{names}: the world size must be at least 1, got {world}.")
    if not 0 <= rank < world:
        raise UserError(f"{names}: rank {rank} is outside 0..{world - 1}.")
    if local_rank < 0:
        raise UserError(f"{names}: the local rank must be >= 0, got {local_rank}.")


def discover_processes(env: Mapping[str, str]) -> ProcessInfo:
    """Read the launch environment. torchrun variables win over SLURM ones (torchrun inside an srun step)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        _check(rank, world, local_rank, "torchrun variables RANK/WORLD_SIZE/LOCAL_RANK")
        addr = env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR)
        if world > 1 and "MASTER_PORT" not in env:
            raise UserError("RANK and WORLD_SIZE are set but MASTER_PORT is not; launch with torchrun or set it.")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 0
        return ProcessInfo(rank, world, local_rank, addr, port, "torchrun")

    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # The step's task count is what srun actually started; SLURM_NTASKS is the allocation's.
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, ntasks_key)
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        _check(rank, world, local_rank, f"SLURM variables SLURM_PROCID/{ntasks_key}/SLURM_LOCALID")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = next(
                (env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in env), None
            )
            if nodelist is None:
                if world > 1:
                    raise UserError("SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the first node's host name.")
                addr = DEFAULT_MASTER_ADDR
            else:
                addr = parse_slurm_nodelist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = slurm_port(_int(env, "SLURM_JOB_ID"))
        elif world > 1:
            raise UserError("SLURM_JOB_ID is not set, so no rendezvous port can be derived; set MASTER_PORT.")
        else:
            port = 0
        return ProcessInfo(rank, world, local_rank, addr, port, "slurm")

    return ProcessInfo()
