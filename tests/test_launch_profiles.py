"""Cluster profiles are data: every bundled one loads, and each mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recpre.errors import UserError
from recpre.launch.profile import (
    PROFILE_DIR,
    REQUIRED,
    available_profiles,
    load_profile,
    parse_profile,
    time_to_minutes,
)

BUNDLED = ["frontier", "local", "parallelcluster-p5", "parallelcluster-trn1", "parallelcluster-trn2", "slurm-gpu"]


def test_bundled_profiles_load() -> None:
    assert available_profiles() == BUNDLED
    for name in BUNDLED:
        profile = load_profile(name)
        assert profile.name == name and profile.description
    assert load_profile("frontier").env["NCCL_SOCKET_IFNAME"] == "hsn"
    trn1 = load_profile("parallelcluster-trn1")
    assert (trn1.launch, trn1.devices_per_node, trn1.master_port) == ("torchrun-per-node", 32, 44000)
    assert trn1.precompile.enabled
    assert load_profile("local").executor == "local"


def _raw(name: str = "slurm-gpu") -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field_names_file_and_field(tmp_path: Path, field: str) -> None:
    raw = _raw()
    del raw[field]
    path = _write(tmp_path, raw)
    with pytest.raises(UserError, match=rf"{path}: field '{field}' is missing"):
        load_profile(str(path))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"launch": "mpirun"}, "launch"),
        ({"executor": "pbs"}, "executor"),
        ({"devices_per_node": 0}, "devices_per_node"),
        ({"devices_per_node": "8"}, "devices_per_node"),
        ({"time": "12h"}, "time"),
        ({"sbatch": {"time": "01:00:00"}}, "sbatch.time"),
        ({"sbatch": {"Bad Key": 1}}, "sbatch.Bad Key"),
        ({"env": {"WANDB_API_KEY": "abc"}}, "env.WANDB_API_KEY"),
        ({"env": {"HF_TOKEN": "abc"}}, "env.HF_TOKEN"),
        ({"env": {"1BAD": "x"}}, "env.1BAD"),
        ({"setup": "module load x"}, "setup"),
        ({"precompile": {"enabled": "yes"}}, "precompile.enabled"),
        ({"gpus": 8}, "gpus"),
    ],
)
def test_bad_field_names_file_and_field(tmp_path: Path, change: dict, field: str) -> None:
    raw = _raw()
    raw.update(change)
    path = _write(tmp_path, raw)
    with pytest.raises(UserError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(UserError, match="unknown cluster profile 'frontir'.*frontier"):
        load_profile("frontir")
    with pytest.raises(UserError, match="does not exist"):
        load_profile("no/such/profile.yaml")


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_profile(str(path))
    with pytest.raises(UserError, match="must be a YAML mapping"):
        parse_profile(None, path)


def test_non_secret_names_pass(tmp_path: Path) -> None:
    raw = _raw()
    raw["env"] = {"NEURON_COMPILE_CACHE_URL": "/fsx/cache", "TOKENIZERS_PARALLELISM": "false", "MONKEY": 1}
    assert load_profile(str(_write(tmp_path, raw))).env["MONKEY"] == "1"


def test_time_to_minutes() -> None:
    assert time_to_minutes("12:00:00") == 720
    assert time_to_minutes("1-00:30:00") == 1470
    assert time_to_minutes("00:00:01") == 1
    assert time_to_minutes("90") == 90
