"""Hugging Face export: the folder reloads through AutoModelForCausalLM with recpre's logits (fp32, 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_run_args

pytest.importorskip("transformers")

from recpre.checkpoint import load_model, save_checkpoint  # noqa: E402
from recpre.model import build_model  # noqa: E402
from recpre.settings import load_settings, model_config, settings_to_yaml  # noqa: E402


def make_checkpoint(run_dir, corpus, *overrides: str):
    settings = load_settings(None, tiny_run_args(run_dir, corpus, *overrides))
    config = model_config(settings)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # move norms / biases off their init values so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return save_checkpoint(
        run_dir / "checkpoints", 1, model=model, model_config=config.to_dict(),
        settings_yaml=settings_to_yaml(settings), state={}, rank_state={},
    )  # fmt: skip


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.overrides.state_init=zero",),
        ("model.overrides.state_init=zero", "model.overrides.injection=add", "model.overrides.block_kind=pre"),
        ("model.name=debug-gpt", "model.overrides.mean_recurrence=1", "model.overrides.mean_backprop_depth=1"),
    ],
    ids=["recurrent", "recurrent-add-prenorm", "gpt"],
)
def test_export_reloads_with_equal_logits(tmp_path, tiny_corpus, overrides):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from recpre.eval.export import export_hf

    ckpt = make_checkpoint(tmp_path / "run", tiny_corpus, *overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "modeling_recpre.py", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ours, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ours.config.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        for steps in [None, 1, 5] if ours.config.is_recurrent else [None]:
            ref = ours(ids, num_steps=steps).logits[..., : ours.config.vocab_size]
            got = hf(ids, num_steps=steps).logits
            assert got.dtype == torch.float32 and got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # left padding through attention_mask gives the unpadded row's logits
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        got = hf(ids, attention_mask=mask).logits[1, 5:]
        ref = ours(ids[1:, 5:]).logits[0, :, : ours.config.vocab_size]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    text = "def f(x):\n    return x + 1\n"
    assert tok.encode(text) == tiny_corpus.tokenizer().encode(text)
    assert tok.eos_token_id == tiny_corpus.eos_id
    generated = hf.generate(ids[:1, :6], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 9)


def test_export_cli_refuses_existing_output(tmp_path, tiny_corpus):
    ckpt = make_checkpoint(tmp_path / "run", tiny_corpus, "model.overrides.state_init=zero")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cmd = [sys.executable, str(REPO / "evaluate" / "export_hf.py"), "--checkpoint", str(ckpt)]
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "taken")], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --output")
    assert (tmp_path / "taken" / "file").exists()
