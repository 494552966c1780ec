"""Every YAML in launch_configs/ loads and validates (the config-hub habit: a broken config fails here, not on
a cluster)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recpre.settings import DEFAULT_CONFIG, load_settings, save_settings, validate_for_world

CONFIG_DIR = DEFAULT_CONFIG.parent
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", "/lustre/data/recpre")
    monkeypatch.delenv("RUNS_DIR", raising=False)


def test_the_expected_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "debug.yaml",
        "debug-gpt.yaml",
        "magpie-150m-gpu.yaml",
        "nebel-raven-3.5b-frontier.yaml",
        "trn1-parallelcluster.yaml",
        "trn2-parallelcluster.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    s = load_settings(path, [])
    assert s.run.name and "${" not in s.run.out_dir
    for entry in [*s.data.train, *s.data.val, s.data.tokenizer or ""]:
        assert "${" not in entry
    save_settings(s, tmp_path / "settings.yaml")
    assert load_settings(tmp_path / "settings.yaml", []) == s


def test_debug_yaml_comments_every_key() -> None:
    """Each key line in debug.yaml carries a comment (the file documents the settings for users)."""
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if re.match(r"^\s+\w+:\s*\S", line) and not line.strip().startswith("#"):
            assert "#" in line, f"debug.yaml line without a comment: {line!r}"


def test_data_dir_configs_read_the_environment() -> None:
    for name in ("magpie-150m-gpu.yaml", "nebel-raven-3.5b-frontier.yaml", "trn1-parallelcluster.yaml",
                 "trn2-parallelcluster.yaml"):  # fmt: skip
        s = load_settings(CONFIG_DIR / name, [])
        assert s.data.train == ["/lustre/data/recpre/train"]
        assert s.data.tokenizer == "/lustre/data/recpre/tokenizer"


def test_huginn_frontier_run() -> None:
    s = load_settings(CONFIG_DIR / "nebel-raven-3.5b-frontier.yaml", [])
    assert s.model.name == "nebel-raven-3.5b"
    assert s.train.micro_batch_size == 1
    validate_for_world(s, 512 * 8)  # one sequence per GCD, no accumulation
    block_size = 4096
    tokens_per_step = s.train.world_batch_size * block_size
    assert tokens_per_step == pytest.approx(16.8e6, rel=0.01)
    assert s.train.max_tokens == 800_000_000_000
    assert 46_000 < s.train.max_tokens // tokens_per_step < 49_000
    assert s.schedule.name == "trapezoid" and s.schedule.cooldown_steps == 0  # constant LR after warmup
    assert s.fabric.precision == "bf16-mixed"


def test_single_node_and_trainium_shapes() -> None:
    magpie = load_settings(CONFIG_DIR / "magpie-150m-gpu.yaml", [])
    validate_for_world(magpie, 8)
    assert (magpie.fabric.precision, magpie.model.fused_head, magpie.model.compile) == ("bf16-mixed", "chunked", True)
    trn = load_settings(CONFIG_DIR / "trn1-parallelcluster.yaml", [])
    validate_for_world(trn, 4 * 32)
    assert (trn.fabric.strategy, trn.fabric.precision, trn.model.attention) == ("xla", "bf16-true", "nki")
    assert trn.model.overrides["block_size"] == 4096


def test_model_shapes_exist_in_registry() -> None:
    from recpre import config
    from recpre import model_registry as registry

    for path in CONFIGS:
        s = load_settings(path, [])
        assert s.model.name in registry.MODELS
        cfg = config.ModelConfig.from_name(s.model.name, **s.model.overrides)
        if path.name.startswith("nebel"):
            assert cfg.block_size == 4096
