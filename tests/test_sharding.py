"""Sharding strategies in multi-process gloo groups (tests/sharding_cases.py under torchrun) and the settings
combinations that are refused before a run folder exists."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_args

from recpre.errors import UserError
from recpre.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case(name: str, tmp_path: Path, nproc: int = 2) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd += ["tests/sharding_cases.py", name, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_looped_core_is_gathered_once_per_pass_at_any_depth(tmp_path):
    """A whole step (forward, backward, end-of-step reshard) of the recurrent model under fsdp: prelude, 2 core
    blocks, coda and root gathered once in forward, prelude and coda again in backward, at depth 1 as at 16."""
    got = case("gathers", tmp_path)
    assert got["1"]["all_gather"] == got["16"]["all_gather"] == 7, got
    assert got["1"]["reduce_scatter"] == got["16"]["reduce_scatter"] == 5, got
    assert got["core_sharded_after_step"]


def test_meta_build_is_initialised_shard_by_shard_like_a_plain_build(tmp_path):
    got = case("meta_init", tmp_path)
    for name in ("debug-recurrent", "debug-gpt"):
        assert got[name]["same"], name
        assert got[name]["local_fraction"] == pytest.approx(0.5, abs=0.01), name  # each rank holds its half only


def test_the_3_5b_model_is_sharded_on_meta_without_allocating_its_weights(tmp_path):
    got = case("big_on_meta", tmp_path)
    assert got["n_params"] == 3_564_976_800 and got["all_dtensor_on_meta"]
    assert got["fsdp_units"] == 9  # 2 prelude + 4 core + 2 coda blocks + the root
    assert got["peak_rss_bytes"] < 2e9  # the fp32 weights alone would be 14.3 GB


def test_optimizer_sharding_balances_flat_ranges_and_reports_whole_matrix_imbalance(tmp_path):
    got = case("imbalance", tmp_path, nproc=3)
    assert got["adamw"] == pytest.approx(1.0, abs=1e-3)  # chunk slices: every rank 1/3 (+ padding)
    assert 1.05 < got["muon"] < 1.3  # whole matrices: the embedding (~39% of debug-gpt) cannot be split


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["fabric.strategy=fsdp", "fabric.optimizer_sharding=true"], "fabric.optimizer_sharding"),
        (["fabric.strategy=torch-ddp", "fabric.optimizer_sharding=true"], "fabric.optimizer_sharding"),
        (["fabric.strategy=fsdp", "optim.name=muon"], "optim.name"),
        (["fabric.strategy=hsdp", "optim.name=muon"], "optim.name"),
        (["fabric.strategy=simple-ddp", "fabric.offload=true"], "fabric.offload"),
        (["fabric.strategy=fsdp", "fabric.offload=true", "fabric.device=cpu"], "fabric.offload"),
        (["fabric.strategy=fsdp", "fabric.shard_size=2"], "fabric.shard_size"),
        (["fabric.strategy=hsdp", "fabric.shard_size=0"], "fabric.shard_size"),
        (["fabric.strategy=simple-ddp", "fabric.shard_group=rack"], "fabric.shard_group"),
    ],
)
def test_impossible_sharding_combinations_are_refused_naming_the_key(overrides, key, tmp_path):
    with pytest.raises(UserError) as err:
        load_settings(None, [f"run.out_dir={tmp_path / 'run'}", *overrides])
    assert str(err.value).startswith(key) and str(err.value).count(".") >= 1
    assert not (tmp_path / "run").exists()


def test_offload_without_a_gpu_and_uneven_hsdp_groups_stop_before_the_run_folder(train_module, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="fabric.offload"):
        train_module.main(
            tiny_run_args(run, tiny_corpus, "fabric.strategy=fsdp", "fabric.offload=true", "fabric.device=auto")
        )
    with pytest.raises(UserError, match="fabric.shard_size"):
        train_module.main(tiny_run_args(run, tiny_corpus, "fabric.strategy=hsdp", "fabric.shard_size=3"))
    assert not run.exists()
