"""LoRA under fsdp and hsdp (train.py under torchrun, 2 gloo ranks): the same run as one process (losses, final
adapters, base hash), checkpoints of adapters only written as DCP shards, resume across strategies in both
directions, and merging a checkpoint written under fsdp."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre.checkpoint import find_latest, load_model, load_state
from recpre.errors import UserError
from recpre.lora import read_adapters
from recpre.monitor import read_metrics
from recpre.settings import load_settings
from recpre.sharded_checkpoint import is_sharded_checkpoint, read_metadata

# Fixed depth and a zero initial state: the forward is the same function on every rank and in one process.
SHORT = [
    "model.overrides.sampling_scheme=fixed",
    "model.overrides.state_init=zero",
    "eval.interval=0",
    "schedule.warmup_steps=1",
    "schedule.cooldown_steps=1",
    "checkpoint.keep=3",
]
LORA = [
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.targets=[core,prelude.attn,coda.mlp]",
    "train.max_steps=4",
    "checkpoint.interval=2",
    *SHORT,
]
STRATEGIES = {
    "single": (1, ["fabric.strategy=single"]),
    "fsdp": (2, ["fabric.strategy=fsdp"]),
    "hsdp": (2, ["fabric.strategy=hsdp", "fabric.shard_size=1"]),  # 2 replicas of 1-rank shard groups
    # ZeRO-1 writes DCP shards too (its optimizer state is spread over ranks)
    "zero": (2, ["fabric.strategy=simple-ddp", "fabric.optimizer_sharding=true", "fabric.shard_group=world"]),
}


def test_lora_settings_accept_fsdp_and_hsdp_and_refuse_xla_and_a_sharded_4bit_or_bf16_true_base():
    for strategy in ("fsdp", "hsdp"):
        load_settings(None, ["model.lora.rank=4", f"fabric.strategy={strategy}"])
    refused = {
        "is 'xla', which LoRA does not support yet; use single, simple-ddp, torch-ddp, fsdp or hsdp": [
            "fabric.strategy=xla",
            "fabric.device=xla",
        ],
        "is '4bit', which fabric.strategy=fsdp cannot shard": ["model.lora.quantize=4bit", "fabric.strategy=fsdp"],
        "use fabric.precision=bf16-mixed": ["fabric.precision=bf16-true", "fabric.strategy=hsdp"],
    }
    for message, overrides in refused.items():
        with pytest.raises(UserError) as err:
            load_settings(None, ["model.lora.rank=4", *overrides])
        assert message in str(err.value) and str(err.value).count(". ") == 0  # one sentence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, corpus, base: Path, strategy: str, *more: str) -> None:
    nproc, extra = STRATEGIES[strategy]
    args = tiny_run_args(out, corpus, f"run.init_from={base}", *LORA, *extra, *more)
    cmd = [sys.executable, "train.py", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train.py", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def assert_same_adapters(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == ref.keys() and got
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=atol, msg=name)


def test_a_lora_model_built_on_meta_is_initialised_shard_by_shard_like_a_plain_build(tmp_path):
    """A fresh base and peft's adapters, sharded over 2 ranks: the plain build's weights (lora_A Kaiming-uniform,
    lora_B zeros, keyed by seed and name; peft's own draws leave torch's stream alone) and its base hash."""
    out = tmp_path / "case.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["tests/sharding_cases.py", "lora_meta_init", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got == {"same": True, "same_hash": True, "adapters": 10, "lora_A_drawn": True}


@pytest.fixture(scope="module")
def base(train_module, tiny_corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base")
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=2", *SHORT, "checkpoint.interval=0")
    assert train_module.main(args) == 0
    return run


@pytest.fixture(scope="module")
def runs(tiny_corpus, base, tmp_path_factory):
    """Each strategy's LoRA run once per module."""
    cache: dict[tuple[str, ...], Path] = {}

    def get(strategy: str, *more: str) -> Path:
        if (strategy, *more) not in cache:
            cache[strategy, *more] = tmp_path_factory.mktemp(f"lora-{strategy}")
            train(cache[strategy, *more], tiny_corpus, base, strategy, *more)
        return cache[strategy, *more]

    return get


# per_iteration 4 at depth 3: the core's last adapter gets no gradient, which the sharded reduction must survive
@pytest.mark.parametrize(
    ("strategy", "more"),
    [
        pytest.param("fsdp", (), id="fsdp"),
        pytest.param("hsdp", (), id="hsdp"),
        pytest.param("zero", (), id="zero", marks=pytest.mark.slow),
        pytest.param("fsdp", ("model.lora.per_iteration=4",), id="fsdp-per-iteration", marks=pytest.mark.slow),
        pytest.param(
            "fsdp", ("model.activation_checkpointing=true",), id="fsdp-activation-checkpointing", marks=pytest.mark.slow
        ),
    ],
)
def test_a_sharded_lora_run_trains_as_one_process_and_saves_adapters_only(runs, strategy, more):
    one, two = runs("single", *more), runs(strategy, *more)
    assert sorted(losses(one)) == [1, 2, 3, 4]
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    ckpt = find_latest(two / "checkpoints")
    assert is_sharded_checkpoint(ckpt)
    assert_same_adapters(read_adapters(ckpt), read_adapters(find_latest(one / "checkpoints")))
    # the shards hold the adapters and their optimizer state only, never the frozen base
    saved = [k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("model/")]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    groups = load_state(ckpt)["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(saved)
    # the base identity is the same (its hash gathered one weight at a time), so resumes may cross strategies
    assert load_state(ckpt)["lora"] == load_state(find_latest(one / "checkpoints"))["lora"]
    with pytest.raises(UserError, match="holds LoRA adapters only.*merge_lora.py"):
        load_model(two)  # what generate, chat and export_hf load


def cut_after_step_2(run: Path, to: Path) -> Path:
    """A copy of `run` as if it had stopped right after its step-2 checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step-00000004")
    (to / "checkpoints" / "latest").write_text("step-00000002\n")
    rows = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("\n".join(r for r in rows if json.loads(r).get("step", 0) <= 2) + "\n")
    return to


@pytest.mark.parametrize(("wrote", "resumes"), [("fsdp", "fsdp"), ("fsdp", "single"), ("single", "fsdp")])
def test_an_interrupted_lora_run_resumes_exactly_under_either_strategy(
    runs, tiny_corpus, base, tmp_path, wrote, resumes
):
    whole = runs(wrote)
    cut = cut_after_step_2(whole, tmp_path / "cut")
    train(cut, tiny_corpus, base, resumes)
    assert losses(cut) == pytest.approx(losses(whole), abs=1e-5) and sorted(losses(cut)) == [1, 2, 3, 4]
    ckpt = find_latest(cut / "checkpoints")
    assert is_sharded_checkpoint(ckpt) == (resumes != "single")
    assert_same_adapters(read_adapters(ckpt), read_adapters(find_latest(whole / "checkpoints")))


def test_merge_lora_accepts_a_checkpoint_written_under_fsdp(runs, tmp_path):
    from recpre.cli.merge_lora import main as merge

    for strategy in ("single", "fsdp"):
        assert merge(["--checkpoint", str(runs(strategy)), "--out", str(tmp_path / strategy)]) == 0
    merged = {s: load_model(tmp_path / s)[0].eval() for s in ("single", "fsdp")}
    single, fsdp = merged["single"].state_dict(), merged["fsdp"].state_dict()
    assert single.keys() == fsdp.keys() and not any(".lora_" in k or "base_layer" in k for k in fsdp)
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged["fsdp"](ids, num_steps=3).logits, merged["single"](ids, num_steps=3).logits, atol=1e-5, rtol=0
        )
