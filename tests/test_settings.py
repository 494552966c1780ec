"""load_settings: YAML + base chains + overrides + interpolation -> one validated Settings, or a UserError
that names the key and the file."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from recpre.errors import UserError
from recpre.settings import (
    DEFAULT_CONFIG,
    Settings,
    load_settings,
    model_config,
    save_settings,
    settings_to_yaml,
    validate_for_world,
)

MINIMAL = """
run:
  name: t
train:
  max_steps: 100
  micro_batch_size: 2
  world_batch_size: 8
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write(tmp_path, "run.yaml", MINIMAL)


def error_of(path: Path | str | None, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_settings(path, list(overrides))
    return str(info.value)


# ---- loading ---------------------------------------------------------------------------------------------------


def test_default_config_is_debug_yaml() -> None:
    assert DEFAULT_CONFIG.name == "debug.yaml" and DEFAULT_CONFIG.is_file()
    s = load_settings(None, [])
    assert isinstance(s, Settings)
    assert s.run.name == "debug"
    assert s.run.out_dir == "runs/debug"
    assert s.model.name == "debug-recurrent"
    assert s.data.train == []
    assert s.fabric.device == "cpu" and s.fabric.precision == "fp32"
    assert s == load_settings(DEFAULT_CONFIG, [])


def test_debug_batches_split_over_1_2_4_ranks() -> None:
    s = load_settings(None, [])
    for world in (1, 2, 4):
        validate_for_world(s, world)


def test_yaml_merged_over_defaults(cfg: Path) -> None:
    s = load_settings(cfg, [])
    assert s.train.max_steps == 100 and s.train.world_batch_size == 8
    assert s.optim == Settings().optim  # untouched sections keep their defaults
    assert s.run.out_dir == "runs/t"  # default out_dir interpolates the YAML's run.name


def test_scientific_notation_is_a_float(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", MINIMAL + "optim:\n  lr: 3e-4\n  eps: 1e-10\n")
    s = load_settings(path, [])
    assert s.optim.lr == pytest.approx(3e-4) and s.optim.eps == pytest.approx(1e-10)


def test_integral_float_accepted_for_int(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "train:\n  max_tokens: 8.0e11\n")
    assert load_settings(path, []).train.max_tokens == 800_000_000_000


# ---- overrides -------------------------------------------------------------------------------------------------


def test_overrides_scalars_nested_lists_dicts(cfg: Path) -> None:
    s = load_settings(
        cfg,
        [
            "optim.lr=3e-4",
            "train.max_steps=50",
            "model.compile=true",
            "log.wandb.mode=offline",
            "eval.depths=[1,2]",
            "data.train=[a.parquet, b]",
            "model.overrides.n_embd=64",
            "model.overrides.n_heads=2",
            "run.init_from=null",
        ],
    )
    assert s.optim.lr == pytest.approx(3e-4)
    assert s.train.max_steps == 50
    assert s.model.compile is True
    assert s.log.wandb.mode == "offline"
    assert s.eval.depths == [1, 2]
    assert s.data.train == ["a.parquet", "b"]
    assert s.model.overrides == {"n_embd": 64, "n_heads": 2}
    assert s.run.init_from is None


def test_later_override_wins(cfg: Path) -> None:
    assert load_settings(cfg, ["optim.lr=1e-3", "optim.lr=2e-3"]).optim.lr == pytest.approx(2e-3)


def test_override_of_run_name_flows_into_out_dir(cfg: Path) -> None:
    assert load_settings(cfg, ["run.name=other"]).run.out_dir == "runs/other"


def test_model_overrides_merge_across_files(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", MINIMAL + "model:\n  overrides: {n_embd: 64}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  overrides: {n_heads: 2}\n")
    s = load_settings(child, ["model.overrides.n_layers_core=1"])
    assert s.model.overrides == {"n_embd": 64, "n_heads": 2, "n_layers_core": 1}


# ---- interpolation ---------------------------------------------------------------------------------------------


def test_env_and_run_name_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECPRE_TEST_DATA", "/data/x")
    monkeypatch.setenv("RECPRE_TEST_STEPS", "77")
    monkeypatch.delenv("RECPRE_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        "a.yaml",
        """
        run:
          name: exp1
          out_dir: ${oc.env:RECPRE_TEST_UNSET,scratch}/${run.name}
        data:
          train: ["${oc.env:RECPRE_TEST_DATA}/train"]
          tokenizer: ${oc.env:RECPRE_TEST_DATA}/tok-${run.name}
        train:
          max_steps: ${oc.env:RECPRE_TEST_STEPS}
        """,
    )
    s = load_settings(path, [])
    assert s.run.out_dir == "scratch/exp1"
    assert s.data.train == ["/data/x/train"]
    assert s.data.tokenizer == "/data/x/tok-exp1"
    assert s.train.max_steps == 77  # converted to the field's type


def test_escaped_interpolation_stays_literal(cfg: Path) -> None:
    s = load_settings(cfg, [r"run.name=a\${b}"])
    assert s.run.name == "a${b}"


# ---- base: inheritance -----------------------------------------------------------------------------------------


def test_base_chain(tmp_path: Path) -> None:
    write(tmp_path, "root.yaml", MINIMAL + "optim:\n  lr: 1.0e-3\n  beta2: 0.99\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "mid.yaml", "base: ../root.yaml\noptim:\n  lr: 2.0e-3\n")
    leaf = write(tmp_path / "sub", "leaf.yaml", "base: mid.yaml\nrun:\n  name: leaf\n")
    s = load_settings(leaf, [])
    assert s.optim.lr == pytest.approx(2e-3)  # mid overrides root
    assert s.optim.beta2 == pytest.approx(0.99)  # root's value survives
    assert s.run.name == "leaf" and s.train.max_steps == 100


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: c.yaml\n")
    write(tmp_path, "c.yaml", "base: a.yaml\n")
    msg = error_of(tmp_path / "a.yaml")
    assert "cycle" in msg and "base" in msg and "a.yaml" in msg and "c.yaml" in msg


def test_base_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "base: nowhere.yaml\n")
    msg = error_of(path)
    assert "base" in msg and "nowhere.yaml" in msg and "a.yaml" in msg


def test_launch_config_extends_debug() -> None:
    s = load_settings(DEFAULT_CONFIG.parent / "debug-gpt.yaml", [])
    assert s.model.name == "debug-gpt"
    assert s.train == load_settings(None, []).train


# ---- round trip ------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECPRE_TEST_DATA", "/data/y")
    s = load_settings(
        None,
        [
            "optim.lr=3e-4",
            "optim.eps=1e-12",
            "model.overrides.n_embd=64",
            "data.train=[${oc.env:RECPRE_TEST_DATA}/a, b]",
            "data.weights=[0.25, 0.75]",
            r"run.name=odd\${name}",
            "train.max_tokens=123456789012",
        ],
    )
    out = tmp_path / "run" / "settings.yaml"
    save_settings(s, out)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
    text = out.read_text()
    assert "oc.env" not in text and "/data/y/a" in text  # resolved, not re-evaluated later
    again = load_settings(out, [])
    assert again == s
    assert dataclasses.asdict(again) == dataclasses.asdict(s)
    assert settings_to_yaml(again) == text


def test_load_settings_writes_nothing(tmp_path: Path, cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load_settings(cfg, [])
    with pytest.raises(UserError):
        load_settings(cfg, ["train.world_batch_size=7"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- errors: each names the key and the file -------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg


def test_malformed_yaml_has_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "run:\n  name: x\noptim:\n  lr: [1, 2\n  beta1: 0.9\n")
    msg = error_of(path)
    assert "bad.yaml" in msg and "line " in msg


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path, "dup.yaml", "optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    msg = error_of(path)
    assert "dup.yaml" in msg and "duplicate key 'lr'" in msg and "line 3" in msg


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", MINIMAL + "optim:\n  lrr: 1.0e-3\n")
    msg = error_of(path)
    assert "optim.lrr" in msg and "a.yaml" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_section_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", MINIMAL + "optimizer:\n  lr: 1.0e-3\n")
    msg = error_of(path)
    assert "optimizer" in msg and "a.yaml" in msg and "did you mean 'optim'" in msg


def test_key_in_wrong_section_suggests_the_right_one(cfg: Path) -> None:
    msg = error_of(cfg, ["train.lr=1e-3"])
    assert "train.lr" in msg and "train.lr=1e-3" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_override_key_names_the_override(cfg: Path) -> None:
    msg = error_of(cfg, ["checkpoint.keeep=3"])
    assert "checkpoint.keeep" in msg and "command-line override" in msg and "checkpoint.keep" in msg


def test_malformed_override(cfg: Path) -> None:
    msg = error_of(cfg, ["optim.lr"])
    assert "optim.lr" in msg and "key=value" in msg


@pytest.mark.parametrize(
    ("yaml_text", "key", "expected"),
    [
        ("train:\n  max_steps: many\n", "train.max_steps", "an integer or null"),
        ("optim:\n  lr: fast\n", "optim.lr", "a number"),
        ("model:\n  compile: maybe\n", "model.compile", "true or false"),
        ("eval:\n  depths: 4\n", "eval.depths", "a list of integers"),
        ("eval:\n  depths: [1, two]\n", "eval.depths", "a list of integers"),
        ("train:\n  micro_batch_size: null\n", "train.micro_batch_size", "an integer"),
        ("optim: 3\n", "optim", "a mapping"),
        ("model:\n  overrides: [1]\n", "model.overrides", "mapping"),
    ],
)
def test_wrong_type(tmp_path: Path, yaml_text: str, key: str, expected: str) -> None:
    path = write(tmp_path, "typed.yaml", yaml_text)  # type errors surface before any cross-field check
    msg = error_of(path)
    assert key in msg and "typed.yaml" in msg and expected in msg


def test_wrong_type_from_override_names_value(cfg: Path) -> None:
    msg = error_of(cfg, ["train.world_batch_size=lots"])
    assert "train.world_batch_size" in msg and "'lots'" in msg and "an integer" in msg and "override" in msg


def test_unset_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECPRE_TEST_NOPE", raising=False)
    path = write(tmp_path, "env.yaml", MINIMAL + 'data:\n  train: ["${oc.env:RECPRE_TEST_NOPE}/train"]\n')
    msg = error_of(path)
    assert "data.train" in msg and "env.yaml" in msg and "RECPRE_TEST_NOPE" in msg and "not set" in msg


def test_env_value_of_wrong_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECPRE_TEST_STEPS", "ten")
    path = write(tmp_path, "env.yaml", "train:\n  max_steps: ${oc.env:RECPRE_TEST_STEPS}\n")
    msg = error_of(path)
    assert "train.max_steps" in msg and "env.yaml" in msg


def test_unknown_interpolation_reference(cfg: Path) -> None:
    msg = error_of(cfg, ["run.out_dir=runs/${run.nam}"])
    assert "run.out_dir" in msg and "override" in msg


@pytest.mark.parametrize("var", ["WANDB_API_KEY", "HF_TOKEN", "MY_SECRET", "DB_PASSWORD"])
def test_secret_env_vars_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "hunter2")
    path = write(tmp_path, "sec.yaml", MINIMAL + f"log:\n  wandb:\n    entity: ${{oc.env:{var}}}\n")
    msg = error_of(path)
    assert "log.wandb.entity" in msg and "sec.yaml" in msg and var in msg and "secret" in msg
    assert "hunter2" not in msg


def test_unknown_model_name_close_matches(cfg: Path) -> None:
    msg = error_of(cfg, ["model.name=debug-recurent"])
    assert "model.name" in msg and "override" in msg and "debug-recurrent" in msg


def test_unknown_model_name_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", MINIMAL + "model:\n  name: magpie-15m\n")
    msg = error_of(path)
    assert "model.name" in msg and "m.yaml" in msg and "magpie-150m" in msg


def test_unknown_model_override_field(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", MINIMAL + "model:\n  overrides:\n    n_embdd: 64\n")
    msg = error_of(path)
    assert "n_embdd" in msg and "m.yaml" in msg and "model.overrides" in msg


def test_max_tokens_budget_checked_against_block_size(cfg: Path) -> None:
    # debug-recurrent: 16 sequences x block_size tokens per step; 1000 tokens is less than one step.
    msg = error_of(None, ["train.max_steps=null", "train.max_tokens=1000"])
    assert "train.max_tokens" in msg and "override" in msg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.world_batch_size=10", "train.micro_batch_size=4"], "train.world_batch_size"),
        (["schedule.warmup_steps=80", "schedule.cooldown_steps=30"], "schedule.warmup_steps"),
        (["train.max_steps=null", "train.max_tokens=null"], "train.max_steps"),
        (["optim.name=adam"], "optim.name"),
        (["schedule.name=cosin"], "schedule.name"),
        (["model.attention=flash2"], "model.attention"),
        (["model.fused_head=fused"], "model.fused_head"),
        (["fabric.precision=bf16"], "fabric.precision"),
        (["fabric.strategy=ddp"], "fabric.strategy"),
        (["fabric.device=gpu"], "fabric.device"),
        (["log.progress=fancy"], "log.progress"),
        (["log.wandb.mode=on"], "log.wandb.mode"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["checkpoint.keep=0"], "checkpoint.keep"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.beta2=1.0"], "optim.beta2"),
        (["eval.depths=[0, 4]"], "eval.depths"),
        (["schedule.min_lr=1.0"], "schedule.min_lr"),
        (["data.weights=[1.0]"], "data.weights"),
        (["data.train=[a, b]", "data.weights=[1.0]"], "data.weights"),
        (["schedule.batch_size_ramp=50", "schedule.ramp_start_batch_size=5"], "schedule.ramp_start_batch_size"),
        (["schedule.batch_size_ramp=50", "schedule.ramp_start_batch_size=32"], "schedule.ramp_start_batch_size"),
        (["schedule.batch_size_ramp=500"], "schedule.batch_size_ramp"),
        (["train.loss_spike_factor=0.5"], "train.loss_spike_factor"),
    ],
)
def test_invalid_combinations(cfg: Path, overrides: list[str], key: str) -> None:
    msg = error_of(cfg, overrides)
    assert msg.startswith(key) or f" {key} " in msg or f"'{key}" in msg, msg
    assert "override" in msg or "run.yaml" in msg, msg


def test_invalid_combination_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "combo.yaml", MINIMAL + "schedule:\n  warmup_steps: 90\n  cooldown_steps: 20\n")
    msg = error_of(path)
    assert "schedule.warmup_steps" in msg and "combo.yaml" in msg and "train.max_steps" in msg


def test_suggests_close_choice(cfg: Path) -> None:
    assert "did you mean 'cosine'" in error_of(cfg, ["schedule.name=cosin"])


def test_validate_for_world(cfg: Path) -> None:
    s = load_settings(cfg, [])  # micro 2, world batch 8
    validate_for_world(s, 1)
    validate_for_world(s, 4)
    with pytest.raises(UserError) as info:
        validate_for_world(s, 3)
    msg = str(info.value)
    assert "train.world_batch_size" in msg and "run.yaml" in msg and "world size (3)" in msg


def test_validate_for_world_ramp(cfg: Path) -> None:
    s = load_settings(cfg, ["schedule.batch_size_ramp=10", "schedule.ramp_start_batch_size=2"])
    validate_for_world(s, 1)
    with pytest.raises(UserError, match="schedule.ramp_start_batch_size"):
        validate_for_world(s, 2)


def test_error_messages_are_one_line(tmp_path: Path, cfg: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "optim:\n  lr: [\n")
    for msg in (error_of(bad), error_of(cfg, ["optim.lrr=1"]), error_of(cfg, ["optim.name=x"])):
        assert "\n" not in msg and msg.endswith((".", "?")), msg


def test_runtime_model_keys_not_in_overrides(cfg: Path) -> None:
    msg = error_of(cfg, ["model.overrides.attention=eager"])
    assert "model.overrides.attention" in msg and "model.attention" in msg and "override" in msg


def test_model_config_combines_name_overrides_and_runtime(cfg: Path) -> None:
    s = load_settings(cfg, ["model.overrides.n_embd=64", "model.attention=eager", "model.fused_head=chunked"])
    mc = model_config(s)
    assert (mc.name, mc.n_embd, mc.attention, mc.fused_head) == ("debug-recurrent", 64, "eager", "chunked")
