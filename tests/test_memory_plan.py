"""The memory planner (recpre/memory_plan.py): its parameter, gradient and optimizer figures equal the `memory`
event measured from the tensors real gloo ranks hold, for every strategy at 1, 2 and 3 ranks (hsdp at 4); the
3.5B Frontier recipe fits a 64 GiB device as shipped and does not under plain torch-ddp; train.py --plan and
submit's check refuse with the planner's remedies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recpre.memory_plan import PlanInputs, state_bytes
from recpre.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
TINY = ["n_embd=32", "n_heads=2", "intermediate_size=64", "block_size=32"]
MODELS = {
    "gpt": ["model.name=debug-gpt"],
    "recurrent": ["model.name=debug-recurrent", "optim.name=ellis-adam", "eval.depths=[1,2]"],
}
STRATEGIES = {
    "single": ["fabric.strategy=single"],
    "simple-ddp": ["fabric.strategy=simple-ddp"],
    "zero": ["fabric.strategy=simple-ddp", "fabric.optimizer_sharding=true", "fabric.shard_group=world"],
    "torch-ddp": ["fabric.strategy=torch-ddp"],
    "fsdp": ["fabric.strategy=fsdp"],
    "hsdp": ["fabric.strategy=hsdp", "fabric.shard_size=2"],
}
FAST = [("recurrent", "fsdp", 3), ("gpt", "zero", 3)]
ALL = [
    (model, strategy, n)
    for model in MODELS
    for strategy in STRATEGIES
    for n in ((4,) if strategy == "hsdp" else (1,) if strategy == "single" else (1, 2, 3))
    if (model, strategy, n) not in FAST
]
# The default suite checks every strategy once (about 2 minutes); RECPRE_EXHAUSTIVE=1 runs every model x strategy x
# world size (about 15 minutes on 2 cores), as done when the planner changes.
EACH_ONCE = [("gpt", "single", 1), ("recurrent", "simple-ddp", 2), ("gpt", "torch-ddp", 2), ("recurrent", "hsdp", 4)]
MATRIX = ALL if os.environ.get("RECPRE_EXHAUSTIVE") == "1" else EACH_ONCE
FRONTIER = "launch_configs/nebel-raven-3.5b-frontier.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(corpus, model: str, strategy: str, out: Path) -> list[str]:
    return [
        *MODELS[model],
        *(f"model.overrides.{o}" for o in TINY),
        *STRATEGIES[strategy],
        f"data.train=[{corpus.train[0]}]",
        f"data.val=[{corpus.val[0]}]",
        f"data.tokenizer={corpus.tokenizer_dir}",
        "train.micro_batch_size=1",
        "train.world_batch_size=12",
        "train.max_steps=1",
        "eval.interval=0",
        "eval.max_batches=12",
        "checkpoint.interval=0",
        "log.progress=none",
        "log.plot=false",
        "fabric.device=cpu",
        f"run.out_dir={out}",
    ]


def measured_and_planned(
    corpus, tmp_path: Path, model: str, strategy: str, nproc: int, *extra: str
) -> tuple[dict, dict]:
    out = tmp_path / f"{model}-{strategy}-{nproc}"
    args = [*args_for(corpus, model, strategy, out), *extra]
    cmd = [sys.executable, "train.py", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *cmd[1:]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "memory"]  # written by rank 0
    planned = state_bytes(PlanInputs.from_settings(load_settings(None, args), nproc, ranks_per_node=nproc), rank=0)
    return {k: event[k] for k in planned}, planned


@pytest.mark.parametrize(("model", "strategy", "nproc"), FAST)
def test_planned_state_equals_the_memory_event(tiny_corpus, tmp_path, model, strategy, nproc):
    measured, planned = measured_and_planned(tiny_corpus, tmp_path, model, strategy, nproc)
    assert planned == measured


@pytest.mark.parametrize(("strategy", "nproc"), [("single", 1), ("fsdp", 2)])
def test_planned_state_of_a_lora_run_equals_the_memory_event(tiny_corpus, tmp_path, strategy, nproc):
    """A LoRA run holds its whole (frozen) base but gradients and optimizer state of its adapters only."""
    lora = ["model.lora.rank=4", "model.lora.targets=[core,prelude.attn]"]
    measured, planned = measured_and_planned(tiny_corpus, tmp_path, "recurrent", strategy, nproc, *lora)
    assert planned == measured
    assert 0 < planned["grads_bytes"] < 0.2 * planned["params_bytes"]


@pytest.mark.parametrize(("model", "strategy", "nproc"), FAST)
def test_every_rank_holds_what_the_plan_says(tmp_path, model, strategy, nproc):
    """Rank 0 alone would not show FSDP's padding or ZeRO-1's uneven slices: every rank reports here."""
    args = [*MODELS[model], *(f"model.overrides.{o}" for o in TINY), *STRATEGIES[strategy], "fabric.device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd += ["tests/memory_plan_case.py", str(tmp_path), *args, "fabric.chunk_mb=0.01"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(nproc)]
    for rank, row in enumerate(rows):
        assert row["planned"] == row["measured"], rank
    assert len({json.dumps(row["measured"]) for row in rows}) > 1  # the ranks differ: the case is not trivial


@pytest.mark.slow
@pytest.mark.parametrize(("model", "strategy", "nproc"), MATRIX)
def test_planned_state_equals_the_memory_event_for_every_strategy(tiny_corpus, tmp_path, model, strategy, nproc):
    measured, planned = measured_and_planned(tiny_corpus, tmp_path, model, strategy, nproc)
    assert planned == measured


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_DIR": str(REPO / "no-data-needed")}
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_the_frontier_recipe_fits_64_gib_as_shipped_and_not_under_plain_torch_ddp():
    plan = ["train.py", "--plan", "--world-size", "4096", "--device-memory-gib", "64", "--config", FRONTIER]
    shipped = run_command(plan)
    assert shipped.returncode == 0, shipped.stderr
    assert "fits in 64 GiB" in shipped.stdout and "does not fit" not in shipped.stdout
    ddp = run_command([*plan, "fabric.strategy=torch-ddp", "fabric.optimizer_sharding=false"])
    assert ddp.returncode == 1, ddp.stderr
    assert "does not fit in 64 GiB" in ddp.stdout
    assert "fabric.strategy=simple-ddp fabric.optimizer_sharding=true (" in ddp.stdout  # a remedy, with its total
    for column in ("params", "grads", "optimizer", "comm", "activations", "margin", "total"):
        assert column in ddp.stdout


def test_submit_refuses_a_job_that_does_not_fit_naming_the_remedy(tmp_path):
    submit = ["launchers/submit.py", "--cluster", "frontier", "--nodes", "512", "--config", FRONTIER, "--dry-run"]
    submit += [f"run.out_dir={tmp_path / 'run'}", "fabric.strategy=torch-ddp", "fabric.optimizer_sharding=false"]
    refused = run_command(submit)
    assert refused.returncode == 2, refused.stderr
    assert refused.stdout == "" and refused.stderr.count("\n") == 1
    assert "64 GiB" in refused.stderr and "fabric.strategy=simple-ddp fabric.optimizer_sharding=true" in refused.stderr
    forced = run_command([*submit, "--no-memory-check"])
    assert forced.returncode == 0, forced.stderr
    assert "train.py --no-memory-check --config" in forced.stdout  # the job's start-up check is skipped too


def test_a_gpu_smaller_than_the_plan_is_refused_at_start_up(monkeypatch):
    """train.py's start-up check on a (pretended) 1 GiB GPU: the planner's sentence, as a UserError."""
    from types import SimpleNamespace

    import torch

    from recpre.errors import UserError
    from recpre.memory_plan import check_device_memory

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**30))
    fabric = SimpleNamespace(device=torch.device("cuda", 0), world_size=1, shard_size=1)
    with pytest.raises(UserError, match=r"needs .* GiB per rank but a device has 1 GiB .*: set "):
        check_device_memory(load_settings(None, ["model.name=debug-gpt", "train.micro_batch_size=64",
                                                 "train.world_batch_size=64"]), fabric)  # fmt: skip
    check_device_memory(load_settings(None, ["model.name=debug-gpt"]), SimpleNamespace(**{**vars(fabric)}))
    # a LoRA run is planned too (gradients and optimizer state of its adapters only)
    with pytest.raises(UserError, match=r"\(debug-gpt \+ LoRA rank 8, single on 1 ranks"):
        check_device_memory(load_settings(None, ["model.name=debug-gpt", "train.micro_batch_size=64",
                                                 "train.world_batch_size=64", "model.lora.rank=8"]), fabric)  # fmt: skip


def test_plan_without_a_world_size_is_bad_input(train_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_module.run_cli(lambda: train_module.main(["--plan"]))
    assert exit_info.value.code == 2 and "--world-size" in capsys.readouterr().err
