"""Multi-process cases of tests/test_sharding.py, one process per rank under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/sharding_cases.py CASE OUT_JSON

Rank 0 writes what it measured to OUT_JSON; the test asserts on it. Each case builds a SimpleFabric from the
torchrun environment, exactly as train.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recpre.config import ModelConfig  # noqa: E402
from recpre.fabric import SimpleFabric  # noqa: E402
from recpre.model import build_model  # noqa: E402

TINY = dict(n_embd=32, n_heads=2, intermediate_size=64, block_size=16, vocab_size=256, state_init="zero")


def fabric(strategy: str = "fsdp", **kw) -> SimpleFabric:
    base = dict(strategy=strategy, precision="fp32", device="cpu", chunk_mb=1.0, timeout_s=60)
    return SimpleFabric(SimpleNamespace(**{**base, **kw})).launch()


def count_gathers() -> dict:
    """All-gathers of one whole training step (forward, backward, end-of-step reshard) at depths 1 and 16."""
    fab = fabric()
    torch.manual_seed(0)
    model = fab.setup_model(build_model(ModelConfig.from_name("debug-recurrent", **TINY), device="meta"))
    counts = {"all_gather": 0, "reduce_scatter": 0}
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def counted_gather(*a, **k):
        counts["all_gather"] += 1
        return gather(*a, **k)

    def counted_scatter(*a, **k):
        counts["reduce_scatter"] += 1
        return scatter(*a, **k)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter
    ids = torch.randint(0, 256, (2, 16))
    out = {}
    for depth in (1, 16, 1):
        counts.update(all_gather=0, reduce_scatter=0)
        model(ids, ids, num_steps=(0, depth)).loss.backward()
        fab.all_reduce_gradients(model)
        model.zero_grad(set_to_none=True)
        out[str(depth)] = dict(counts)
    core = model.recurrent_blocks()[0]
    out["core_sharded_after_step"] = all(p.to_local().numel() < p.numel() for p in core.parameters() if p.dim() > 1)
    return out


def meta_init() -> dict:
    """The weights of a meta-device build sharded and initialised by the fabric, against a plain build."""
    result = {}
    for name in ("debug-recurrent", "debug-gpt"):
        config = ModelConfig.from_name(name, **(TINY if name == "debug-recurrent" else {"n_embd": 32, "n_heads": 2}))
        fab = fabric()
        torch.manual_seed(11)
        model = fab.setup_model(build_model(config, device="meta"))
        full = fab.full_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))["model"]
        torch.manual_seed(11)
        plain = build_model(config, device="cpu").state_dict()
        local = sum(p.to_local().numel() for p in model.parameters())
        result[name] = {
            "same": fab.is_main
            and all(torch.equal(full[k], v) for k, v in plain.items())
            and full.keys() == plain.keys(),
            "local_fraction": local / sum(v.numel() for v in plain.values()),
        }
    return result


def big_on_meta() -> dict:
    """nebel-raven-3.5b wrapped per block under fsdp on the meta device: nothing of its 14 GB is allocated."""
    from recpre.sharding import wrap

    fab = fabric()
    model = build_model(ModelConfig.from_name("nebel-raven-3.5b"), device="meta")
    wrap(model, fab.mesh, precision="bf16-mixed", offload=False)
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    status = Path("/proc/self/status").read_text().splitlines()
    rss = int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024
    return {
        "n_params": sum(p.numel() for p in params),
        "all_dtensor_on_meta": all(isinstance(p, DTensor) and p.is_meta for p in params),
        "fsdp_units": sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP")),
        "peak_rss_bytes": rss,
    }


def zero_imbalance() -> dict:
    """Per-rank share of the optimizer state under optimizer sharding: flat ranges (AdamW) and whole matrices (Muon)."""
    out = {}
    for optim in ("adamw", "muon"):
        fab = fabric("simple-ddp", optimizer_sharding=True, shard_group="world")
        torch.manual_seed(0)
        model = fab.setup_model(build_model(ModelConfig.from_name("debug-gpt"), device="cpu"))
        from recpre.optim import build_optimizer

        opt = fab.setup_optimizer(build_optimizer(model, SimpleNamespace(name=optim, lr=1e-3)))
        out[optim] = opt.imbalance()
    return out


def lora_meta_init() -> dict:
    """A LoRA model (fresh base, adapters injected) built on meta and sharded, against a plain build: the same base
    and adapters on every rank, and the same base hash, gathered one weight at a time."""
    from recpre.lora import apply_lora, base_hash, lora_init_parameter

    lora = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, targets=["core", "prelude.attn"], per_iteration=0,
                           quantize=None)  # fmt: skip
    config = ModelConfig.from_name("debug-recurrent", **TINY)
    fab = fabric()
    torch.manual_seed(11)
    model = build_model(config, device="meta")
    apply_lora(model, lora, seed=5)
    model = fab.setup_model(model, lora_init_parameter(model, seed=5))
    sharded_hash = base_hash(model)
    full = fab.full_state_dict(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    torch.manual_seed(11)
    plain = build_model(config, device="cpu")
    plain_hash = base_hash(plain)
    apply_lora(plain, lora, seed=5)
    state = plain.state_dict()
    adapters = [k for k in state if ".lora_A." in k]
    return {
        "same": fab.is_main
        and full["model"].keys() == state.keys()
        and all(torch.equal(full["model"][k], v) for k, v in state.items()),
        "same_hash": sharded_hash == plain_hash,
        "adapters": len(adapters),
        "lora_A_drawn": all(0 < float(state[k].abs().max()) < 1 for k in adapters),
    }


CASES = {"gathers": count_gathers, "meta_init": meta_init, "big_on_meta": big_on_meta, "imbalance": zero_imbalance,
         "lora_meta_init": lora_meta_init}  # fmt: skip

if __name__ == "__main__":
    torch.set_num_threads(1)
    case, path = sys.argv[1], Path(sys.argv[2])
    result = CASES[case]()
    if dist.get_rank() == 0:
        path.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
