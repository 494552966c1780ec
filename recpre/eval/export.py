"""Checkpoint -> Hugging Face folder: safetensors, config.json, tokenizer, and self-contained modeling code.

The folder loads with `transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and gives
recpre's logits (over the real vocabulary; padded embedding rows are dropped from the output, not the weights).
A recurrent model is exported with a zero initial state by default, like recpre's own evaluation and generation:
a model trained with `like-init` would otherwise draw fresh noise in every forward, so two calls on the same input
would give different logits (and lm-eval scores would depend on the draw).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from recpre.errors import UserError

MODELING_FILE = Path(__file__).resolve().parent / "hf" / "modeling_recpre.py"


def hf_config(config, tokenizer=None, *, state_init: str | None = None) -> dict:
    """config.json for a recpre ModelConfig (fields the modeling code reads, plus Hugging Face's own keys)."""
    d = config.to_dict()
    ids = {
        "bos_token_id": d.get("bos_id") if d.get("bos_id") is not None else getattr(tokenizer, "bos_id", None),
        "eos_token_id": d.get("eos_id") if d.get("eos_id") is not None else getattr(tokenizer, "eos_id", None),
        "pad_token_id": d.get("pad_id") if d.get("pad_id") is not None else getattr(tokenizer, "pad_id", None),
    }
    keys = [
        *("architecture", "block_size", "vocab_size", "n_embd", "n_heads", "n_kv_heads", "intermediate_size"),
        *("n_layers", "n_layers_prelude", "n_layers_core", "n_layers_coda", "block_kind", "norm_eps", "injection"),
        *("state_init", "mean_recurrence", "rope_base", "qk_bias", "bias", "tie_embeddings"),
    ]
    out = {k: d[k] for k in keys}
    out.update(
        padded_vocab_size=config.padded_vocab_size,
        init_std=config.init_std,
        emb_scale=config.emb_scale,
        model_type="recpre",
        architectures=["RecpreForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_recpre.RecpreConfig",
            "AutoModelForCausalLM": "modeling_recpre.RecpreForCausalLM",
        },
        torch_dtype="float32",
        tie_word_embeddings=False,
        **ids,
    )
    if state_init is not None:
        out["state_init"] = state_init
    return out


def export_hf(
    checkpoint: str | Path, output: str | Path, *, state_init: str | None = "zero", force: bool = False
) -> Path:
    """Write the Hugging Face folder for `checkpoint` to `output` (atomically: a temp folder renamed into place).

    state_init: the exported initial recurrent state; None keeps the checkpoint's (module docstring: why zero).
    """
    from safetensors.torch import save_file

    from recpre.checkpoint import load_model, resolve_checkpoint
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.tasks import run_tokenizer

    output = Path(output)
    taken = any(output.iterdir()) if output.is_dir() else output.exists()
    if taken and not force:
        raise UserError(f"--output {output} already exists; pass --force to replace it or choose another folder")
    folder = resolve_checkpoint(checkpoint)
    model, settings = load_model(folder)
    tokenizer_dir = run_tokenizer(settings, model.config)
    tokenizer = load_tokenizer(tokenizer_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(model.config, tokenizer, state_init=state_init)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(MODELING_FILE, tmp / "modeling_recpre.py")
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        inverse = {v: k for k, v in vocab.items()}
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size}
        for role in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{role}_id")
            if token_id is not None:
                tok_config[f"{role}_token"] = inverse[token_id]
        if getattr(settings.data, "format", None) == "chat":  # transformers' apply_chat_template asks as trained
            from recpre.data.chat_template import load_chat_template

            tok_config["chat_template"] = load_chat_template(settings.data.chat_template)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "use_cache": False}, indent=2) + "\n")
        readme = model_card(model.config, config["state_init"], folder.name, output.name)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def model_card(config, state_init: str, checkpoint_name: str, folder_name: str) -> str:
    """The exported README: how to load the folder and, for a recurrent model, how to pick depth and state."""
    text = (
        f"# {config.name}\n\nExported by recpre from `{checkpoint_name}`. Load with\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'path = "{folder_name}"  # this folder\n'
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n```\n"
    )
    if not config.is_recurrent:
        return text
    trained = (
        " Training started it from random noise (`like-init`); setting `state_init` to `like-init` restores that, "
        "with fresh noise (and different logits) in every forward."
        if config.state_init == "like-init"
        else " Training did the same."
    )
    noise = (
        "The recurrence starts from a zero state (`state_init: zero` in config.json), so the same input always "
        f"gives the same logits.{trained}\n"
        if state_init == "zero"
        else "The recurrence starts from fresh random noise in every forward (`state_init: like-init` in "
        "config.json), as in training, so two calls on the same input give different logits; set `state_init` to "
        "`zero` for deterministic outputs.\n"
    )
    return text + (
        f"\n`model(input_ids, num_steps=r)` and `model.generate(input_ids, num_steps=r, ...)` run r iterations of the "
        f"recurrent core (default: the mean, {config.mean_recurrence}); more iterations, more compute per token.\n\n"
        + noise
    )
