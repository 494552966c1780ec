"""LoRA runs of train.py: adapter-only checkpoints with the base's identity, exact resume, the base check, activation
checkpointing, merging into a full checkpoint that everything else loads, QLoRA's refusal off CUDA, and the
LoRA SFT config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import signal_after_step, tiny_run_args
from safetensors.torch import load_file

from recpre.checkpoint import MODEL_FILE, find_latest, load_model, load_state, read_model_config
from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.lora import apply_lora, load_adapters
from recpre.model import build_model
from recpre.monitor import read_metrics
from recpre.settings import load_settings

SHORT = ["checkpoint.interval=0", "eval.interval=0", "schedule.warmup_steps=0", "schedule.cooldown_steps=0"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", *SHORT]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest(run / "checkpoints") / MODEL_FILE))


@pytest.fixture(scope="module")
def bases(train_module, tiny_corpus, tmp_path_factory):
    """Two short pretraining runs of the tiny model: the base LoRA runs start from, and another one."""
    root = tmp_path_factory.mktemp("bases")
    out = []
    for name, seed in (("base", 7), ("other", 8)):
        args = tiny_run_args(root / name, tiny_corpus, "train.max_steps=2", f"run.seed={seed}", *SHORT)
        assert train_module.main(args) == 0
        out.append(root / name)
    return out


def lora_args(run: Path, corpus, base: Path, *extra: str) -> list[str]:
    return tiny_run_args(run, corpus, f"run.init_from={base}", *LORA, *extra)


def test_lora_resume_is_exact_and_checkpoints_hold_small_adapters(
    train_module, tiny_corpus, bases, tmp_path, monkeypatch, capsys
):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    extra = ["model.lora.dropout=0.1", "model.lora.targets=[core,coda.mlp]"]  # dropout: the RNG resumes too
    assert train_module.main(lora_args(ref, tiny_corpus, bases[0], *extra)) == 0
    out = capsys.readouterr().out
    assert "trainable " in out and "checkpoints hold the adapters only" in out
    with signal_after_step(3):
        assert train_module.main(lora_args(stopped, tiny_corpus, bases[0], *extra)) == 0
    assert find_latest(stopped / "checkpoints").name == "step-00000003"
    assert train_module.main(lora_args(stopped, tiny_corpus, bases[0], *extra)) == 0
    assert losses(stopped) == losses(ref) and sorted(losses(ref)) == list(range(1, 9))
    a, b = adapters(ref), adapters(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the weights file holds the adapters only (they moved from B = 0), far smaller than the base's
    assert a and all(".lora_A." in k or ".lora_B." in k for k in a)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in a.items())
    ckpt = find_latest(ref / "checkpoints")
    base_file = find_latest(bases[0] / "checkpoints") / MODEL_FILE
    assert (ckpt / MODEL_FILE).stat().st_size < 0.1 * base_file.stat().st_size
    identity = load_state(ckpt)["lora"]["base"]
    assert identity["init_from"] == str(bases[0]) and identity["checkpoint"] == str(base_file)
    assert len(identity["sha256"]) == 64
    # a tool that needs a whole model says how to get one
    with pytest.raises(UserError, match="merge_lora.py"):
        load_model(ref)


def test_resume_refuses_adapters_of_another_base(train_module, tiny_corpus, bases, tmp_path):
    run = tmp_path / "run"
    assert train_module.main(lora_args(run, tiny_corpus, bases[0], "train.max_steps=2")) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UserError) as err:
        train_module.main(lora_args(run, tiny_corpus, bases[1], "train.max_steps=4"))
    message = str(err.value)
    assert "trained on the base" in message and "set run.init_from to the base it was trained on" in message
    assert message.count(". ") == 0 and sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_lora_step_with_activation_checkpointing_equals_one_without(train_module, tiny_corpus, bases, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    extra = ["train.max_steps=2", "model.lora.per_iteration=2", "model.lora.targets=[core]"]
    assert train_module.main(lora_args(plain, tiny_corpus, bases[0], *extra)) == 0
    args = lora_args(ckpt, tiny_corpus, bases[0], *extra, "model.activation_checkpointing=true")
    assert train_module.main(args) == 0
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-6)
    a, b = adapters(plain), adapters(ckpt)
    assert any(".lora_B.iter1." in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def _lora_model(run: Path, base: Path) -> torch.nn.Module:
    """The LoRA run's model rebuilt by hand: its base plus its adapters, unmerged."""
    ckpt = find_latest(run / "checkpoints")
    config = ModelConfig.from_dict(read_model_config(ckpt))
    model = build_model(config)
    model.load_state_dict(load_file(str(find_latest(base / "checkpoints") / MODEL_FILE)))
    apply_lora(model, load_settings(ckpt / "settings.yaml", []).model.lora)
    load_adapters(model, ckpt / MODEL_FILE)
    return model


def test_merge_lora_writes_a_full_checkpoint_with_the_same_logits(train_module, tiny_corpus, bases, tmp_path):
    from recpre.cli.merge_lora import main as merge

    run, out = tmp_path / "run", tmp_path / "merged"
    assert train_module.main(lora_args(run, tiny_corpus, bases[0], "train.max_steps=3")) == 0
    assert merge(["--checkpoint", str(run), "--out", str(out)]) == 0
    merged, settings = load_model(out)  # what generate, chat and export_hf load
    assert settings.model.lora.rank == 0
    unmerged = _lora_model(run, bases[0]).eval()
    for m in (merged, unmerged):
        m.config.state_init = "zero"  # a deterministic initial state
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids, num_steps=3).logits, unmerged(ids, num_steps=3).logits, atol=1e-5, rtol=0
        )
    # a merged checkpoint starts a new run like any other
    nxt = tmp_path / "next"
    assert train_module.main(tiny_run_args(nxt, tiny_corpus, f"run.init_from={out}", "train.max_steps=1", *SHORT)) == 0
    # refusals: merging twice, a taken --out
    assert merge(["--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 2
    assert merge(["--checkpoint", str(run), "--out", str(out)]) == 2


def test_merge_lora_refuses_per_iteration_adapters(train_module, tiny_corpus, bases, tmp_path, capsys):
    from recpre.cli.merge_lora import main as merge

    run = tmp_path / "run"
    args = lora_args(run, tiny_corpus, bases[0], "train.max_steps=1", "model.lora.per_iteration=2")
    assert train_module.main(args) == 0
    capsys.readouterr()
    assert merge(["--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged into one shared weight" in err and not (tmp_path / "out").exists()


def test_qlora_is_refused_off_cuda_in_one_sentence(train_module, tiny_corpus, bases, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        train_module.main(lora_args(run, tiny_corpus, bases[0], "model.lora.quantize=4bit"))
    assert not run.exists()


@pytest.mark.gpu
def test_qlora_trains_adapters_on_a_4bit_base(train_module, tiny_corpus, bases, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs a CUDA GPU")
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install -e '.[qlora]')")
    run = tmp_path / "run"
    args = lora_args(run, tiny_corpus, bases[0], "model.lora.quantize=4bit", "fabric.device=cuda", "train.max_steps=3")
    assert train_module.main(args) == 0
    rows = losses(run)
    assert sorted(rows) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in rows.values())
    assert adapters(run) and all(".lora_" in k for k in adapters(run))  # the 4-bit base is never saved


def test_the_lora_sft_config_trains_adapters_of_the_debug_model(train_module, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "launch_configs" / "sft-lora-debug.yaml"
    run = tmp_path / "sft"
    args = ["--config", str(config), f"run.out_dir={run}", f"run.init_from={tmp_path / 'none'}"]
    args += ["train.max_steps=2", "train.micro_batch_size=1", "train.world_batch_size=2", "eval.max_batches=1"]
    args += ["eval.interval=2", "log.plot=false", "log.progress=none", "schedule.warmup_steps=1"]
    assert train_module.main(args) == 0
    out = capsys.readouterr().out
    fraction = float(out.split("trainable ")[1].split("%")[0])
    assert 0 < fraction < 6  # rank 8 on every attention and MLP projection of debug-recurrent
    assert all(".lora_" in k for k in adapters(run)) and len(losses(run)) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lora_on_two_gloo_ranks_trains_as_one_process(tiny_corpus, bases, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    def run(out: Path, nproc: int) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
        strategy = "single" if nproc == 1 else "simple-ddp"
        args = lora_args(out, tiny_corpus, bases[0], "train.max_steps=3", "train.world_batch_size=8",
                         "model.lora.targets=[core,prelude.attn]", f"fabric.strategy={strategy}")  # fmt: skip
        cmd = [sys.executable, "train.py", *args]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={_free_port()}", "train.py", *args]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return losses(out), adapters(out)

    (one, a), (two, b) = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert sorted(one) == [1, 2, 3] and one == pytest.approx(two, abs=1e-5)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
