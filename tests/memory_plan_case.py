"""Every rank's memory report against the planner, one process per rank under torchrun:

    python -m torch.distributed.run --nproc_per_node 3 tests/memory_plan_case.py OUT_DIR key=value ...

Each rank sets up model and optimizer through the fabric as train.py does, takes one training step, and writes
{"measured": its memory report, "planned": the planner's figures for its rank} to OUT_DIR/rank-R.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recpre.fabric import SimpleFabric  # noqa: E402
from recpre.memory_plan import PlanInputs, state_bytes  # noqa: E402
from recpre.model import build_model  # noqa: E402
from recpre.optim import build_optimizer  # noqa: E402
from recpre.settings import load_settings, model_config  # noqa: E402


def main(out_dir: str, overrides: list[str]) -> None:
    settings = load_settings(None, overrides)
    fabric = SimpleFabric(settings.fabric).launch()
    config = model_config(settings)
    fabric.seed_everything(0)
    model = fabric.setup_model(build_model(config, device="meta" if fabric.builds_on_meta else "cpu"))
    optimizer = fabric.setup_optimizer(build_optimizer(fabric.unwrap(model), settings.optim))
    tokens = torch.randint(0, config.vocab_size, (1, config.block_size), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens).loss.backward()
    fabric.all_reduce_gradients(model)
    fabric.clip_grad_norm(model, [p for p in model.parameters() if p.requires_grad], 1.0)
    fabric.optimizer_step(optimizer)
    measured = fabric.memory_report(model, optimizer)
    inputs = PlanInputs.from_settings(settings, fabric.world_size, ranks_per_node=fabric.world_size)
    planned = state_bytes(inputs, fabric.rank)
    row = {"measured": {k: measured[k] for k in planned}, "planned": planned}
    (Path(out_dir) / f"rank-{fabric.rank}.json").write_text(json.dumps(row))
    fabric.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
