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


def _greedy_new_tokens(sequences: torch.Tensor, prompt_len: int, eos_id: int) -> list[int]:
    """New tokens up to and including the first EOS (the two generators differ only in what follows it)."""
    new = sequences[0, prompt_len:].tolist()
    return new[: new.index(eos_id) + 1] if eos_id in new else new


def test_export_generates_at_the_depth_asked_deterministically(tmp_path, tiny_corpus):
    """An export of a model trained with random initial states (`like-init`) is deterministic by default, and
    `generate(..., num_steps=d)` decodes at depth d, token for token as recpre's own greedy decoding does."""
    from transformers import AutoModelForCausalLM

    from recpre.generation import generate

    ckpt = make_checkpoint(tmp_path / "run", tiny_corpus)  # the shape's default state_init: like-init
    ours, _ = load_model(ckpt)
    assert ours.config.state_init == "like-init"
    cmd = [sys.executable, str(REPO / "evaluate" / "export_hf.py"), "--checkpoint", str(ckpt)]
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "hf")], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, hf(ids).logits)  # two forwards, the same logits

    ours.config.state_init = "zero"  # recpre's generate CLI default; the export's documented default
    eos = tiny_corpus.eos_id
    prompt = ids[:1, :8]
    by_depth = {}
    for depth in (1, 4, 32):
        got = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_steps=depth)
        ref = generate(ours, prompt, max_new_tokens=12, num_steps=depth)
        by_depth[depth] = _greedy_new_tokens(got, 8, eos)
        assert by_depth[depth] == _greedy_new_tokens(ref, 8, eos), depth
    assert by_depth[1] != by_depth[4] != by_depth[32] != by_depth[1]


def test_exported_readme_loads_model_and_tokenizer_with_remote_code(tmp_path, tiny_corpus, monkeypatch):
    """The exported README's snippet runs as written (next to the folder) with trust_remote_code=True for both."""
    import re

    from recpre.eval.export import export_hf

    out = export_hf(make_checkpoint(tmp_path / "run", tiny_corpus), tmp_path / "hf")
    readme = (out / "README.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert re.search(r"AutoTokenizer\.from_pretrained\([^)]*trust_remote_code=True", snippet)
    assert re.search(r"AutoModelForCausalLM\.from_pretrained\([^)]*trust_remote_code=True", snippet)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the README's own code, as a user pastes it
    text = "def f(x):\n    return x + 1\n"
    assert scope["tokenizer"](text)["input_ids"] == tiny_corpus.tokenizer().encode(text)
    assert scope["model"](torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)


def test_a_fine_tuned_chat_run_exports_with_its_template(sft_run, tmp_path):
    """A run fine-tuned on conversations exports its chat template: transformers' apply_chat_template on the
    exported tokenizer renders a conversation exactly as the run's training data was rendered."""
    from transformers import AutoTokenizer

    from recpre.data.chat import special_tokens
    from recpre.data.chat_template import load_chat_template, render_chat
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.export import export_hf

    out = export_hf(sft_run, tmp_path / "hf")
    messages = [{"role": "user", "content": "What is 3?"}, {"role": "assistant", "content": "It is 3."}]
    hf = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(out / "tokenizer.json")
    expected = render_chat(load_chat_template("plain"), messages, special_tokens=special_tokens(ours))
    assert "<|assistant|>" in expected
    assert hf.apply_chat_template(messages, tokenize=False) == expected
