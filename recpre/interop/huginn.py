"""The public Huginn-0125 checkpoint format (`RavenForCausalLM`, model type `huginn_raven`), both ways.

A Huginn folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. recpre's RecurrentGPT uses the reference's tensor names, so weights map one to
one; `lm_head.weight` is the tied embedding (checked equal on import, written as a copy on export) and
`freqs_cis` (a RoPE table the reference stores as a buffer) is recomputed. Every config key is either mapped,
checked against what recpre computes, or listed below as a generic Hugging Face field with no effect on the
function; anything else is an error naming it, so a format change can never be skipped silently.

The real 3.5B checkpoint: `huggingface-cli download tomg-group-umd/huginn-0125 --local-dir huginn-0125`
(~7 GB in bfloat16; `from_huginn` holds it in float32 by default: ~14.3 GB of host memory).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recpre.config import ModelConfig
from recpre.errors import UserError
from recpre.model import RecurrentGPT, build_model

# Generic Hugging Face PretrainedConfig / generation fields: they do not change the model function.
_HF_GENERIC = frozenset(
    [
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "add_cross_attention",
        "architectures",
        "auto_map",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "torch_dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "label2id",
        "is_decoder",
        "is_encoder_decoder",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
        "use_cache",
    ]
)
# Huginn fields that only affect training-time machinery or initialisation, not the function of the weights.
_HUGINN_NON_FUNCTIONAL = frozenset({"activation_checkpoint_impl", "init_orthogonal", "test_time_noise_type"})
# Fixed by the reference implementation: the only values recpre (and the reference model class) compute.
_REQUIRED_VALUES = {
    "model_type": "huginn_raven",
    "architecture_class_name": "RecurrentGPT",
    "block_class_name": "SandwichBlock",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "norm_class_name": "RMSNorm_llama",
}
# Huginn key -> ModelConfig field.
_MAPPED = {
    "n_embd": "n_embd",
    "n_heads": "n_heads",
    "intermediate_size": "intermediate_size",
    "n_layers_in_prelude": "n_layers_prelude",
    "n_layers_in_recurrent_block": "n_layers_core",
    "n_layers_in_coda": "n_layers_coda",
    "block_size": "block_size",
    "vocab_size": "vocab_size",
    "padding_multiple": "padding_multiple",
    "norm_eps": "norm_eps",
    "rope_base": "rope_base",
    "qk_bias": "qk_bias",
    "bias": "bias",
    "tie_embeddings": "tie_embeddings",
    "injection_type": "injection",
    "state_init": "state_init",
    "mean_recurrence": "mean_recurrence",
    "mean_backprop_depth": "mean_backprop_depth",
    "sampling_scheme": "sampling_scheme",
    "init_strategy": "init_strategy",
    "bos_token_id": "bos_id",
    "eos_token_id": "eos_id",
    "pad_token_id": "pad_id",
}
# Derived values, checked against what recpre derives from the mapped fields.
_CHECKED = frozenset(
    {
        "num_key_value_heads",
        "num_attention_heads",
        "head_dim",
        "n_layers",
        "padded_vocab_size",
        "effective_expected_depth",
        "tie_word_embeddings",
        "init_values",
        "test_time_noise",
    }
)
_DERIVED_TENSORS = frozenset({"freqs_cis"})  # RoPE table buffer; recpre recomputes it


def huginn_config_to_model_config(d: dict[str, Any], *, name: str = "huginn") -> ModelConfig:
    """Map a Huginn `config.json` dict onto a ModelConfig; unknown keys or unsupported values are UserErrors."""
    known = _HF_GENERIC | _HUGINN_NON_FUNCTIONAL | set(_REQUIRED_VALUES) | set(_MAPPED) | _CHECKED
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise UserError(f"Huginn config: unknown key(s) {', '.join(unknown)}; recpre does not know how to map them.")
    for key, value in _REQUIRED_VALUES.items():
        if key in d and d[key] != value:
            raise UserError(f"Huginn config: {key} is '{d[key]}'; recpre supports only '{value}'.")
    fields: dict[str, Any] = {"name": name, "architecture": "recurrent", "block_kind": "sandwich"}
    for key, target in _MAPPED.items():
        if key in d and d[key] is not None:
            fields[target] = d[key]
    if "n_heads" not in d and d.get("num_attention_heads") is not None:
        fields["n_heads"] = d["num_attention_heads"]
    for key in ("n_embd", "n_heads", "intermediate_size", "vocab_size"):
        if key not in fields:
            raise UserError(f"Huginn config: required key '{key}' is missing.")
    for key in ("n_layers_prelude", "n_layers_core", "n_layers_coda", "mean_recurrence", "mean_backprop_depth"):
        fields.setdefault(key, ModelConfig.__dataclass_fields__[key].default)
    fields.setdefault("padding_multiple", 1)
    kv = d.get("num_key_value_heads")
    fields["n_kv_heads"] = None if kv is None or kv == fields["n_heads"] else kv
    fields["rope_base"] = float(fields.get("rope_base", 50000.0))
    config = ModelConfig(**fields)  # validates the shape

    if d.get("padded_vocab_size") is not None and d["padded_vocab_size"] != config.padded_vocab_size:
        # The reference pads to padded_vocab_size directly; honour it through the padding multiple.
        if d["padded_vocab_size"] < config.vocab_size:
            raise UserError("Huginn config: padded_vocab_size is smaller than vocab_size.")
        config.padding_multiple = d["padded_vocab_size"]
    expect = {
        "num_attention_heads": config.n_heads,
        "head_dim": config.head_dim,
        "n_layers": config.n_blocks,
        "effective_expected_depth": config.effective_depth,
        "tie_word_embeddings": config.tie_embeddings,
        "test_time_noise": 0,
    }
    for key, value in expect.items():
        if d.get(key) is not None and d[key] != value:
            raise UserError(f"Huginn config: {key} is {d[key]!r} but the other fields give {value!r}.")
    scale = (d.get("init_values") or {}).get("embed_scale")
    if scale is not None and not math.isclose(scale, config.emb_scale, rel_tol=1e-6):
        raise UserError(f"Huginn config: init_values.embed_scale {scale} differs from sqrt(n_embd) {config.emb_scale}.")
    return config


def model_config_to_huginn_config(c: ModelConfig) -> dict[str, Any]:
    """The Huginn `config.json` for a RecurrentGPT config (sandwich blocks, linear injection only)."""
    if not c.is_recurrent or c.block_kind != "sandwich" or c.injection != "linear":
        raise UserError(
            f"model '{c.name}': the Huginn format holds recurrent models with sandwich blocks and a linear adapter "
            f"(got architecture={c.architecture}, block_kind={c.block_kind}, injection={c.injection})."
        )
    if c.emb_scale != math.sqrt(c.n_embd):
        raise UserError(f"model '{c.name}': the Huginn format fixes embedding_scale to sqrt(n_embd).")
    std = math.sqrt(2 / (5 * c.n_embd))
    return {
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "n_embd": c.n_embd,
        "n_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "n_layers": c.n_blocks,
        "n_layers_in_prelude": c.n_layers_prelude,
        "n_layers_in_recurrent_block": c.n_layers_core,
        "n_layers_in_coda": c.n_layers_coda,
        "block_size": c.block_size,
        "vocab_size": c.vocab_size,
        "padding_multiple": c.padding_multiple,
        "padded_vocab_size": c.padded_vocab_size,
        "norm_eps": c.norm_eps,
        "rope_base": c.rope_base,
        "qk_bias": c.qk_bias,
        "bias": c.bias,
        "tie_embeddings": c.tie_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "injection_type": c.injection,
        "state_init": c.state_init,
        "mean_recurrence": c.mean_recurrence,
        "mean_backprop_depth": c.mean_backprop_depth,
        "sampling_scheme": c.sampling_scheme,
        "init_strategy": c.init_strategy,
        "effective_expected_depth": c.effective_depth,
        "init_values": {
            "std": std,
            "out_proj": std / math.sqrt(2 * c.effective_depth),
            "embedding": std,
            "embed_scale": math.sqrt(c.n_embd),
        },
        "test_time_noise": 0,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id,
    }


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it ({} when the folder has no weights)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if any(folder.glob("*.bin")):
        raise UserError(f"{folder}: only safetensors weights are supported; convert the .bin files first.")
    return {}


def _expected_tensors(model: RecurrentGPT) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in model.named_parameters()}


def from_huginn(
    path: str | Path,
    *,
    state_init: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RecurrentGPT:
    """Load a Huginn folder as a RecurrentGPT (`state_init="zero"` for deterministic inference).

    On device "meta" only the shape is built (weights, when present, are checked by name and shape from the
    safetensors headers without being read).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json; pass a folder in the Huginn format.")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err}).") from err
    config = huginn_config_to_model_config(raw, name=folder.name or "huginn")
    if state_init is not None:
        config.state_init = state_init
        config.validate()
    meta = build_model(config, device="meta")
    expected = _expected_tensors(meta)
    files = _weight_files(folder)
    if not files and torch.device(device).type != "meta":
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json.")

    unknown = sorted(n for n in files if n not in expected and n not in _DERIVED_TENSORS and n != "lm_head.weight")
    if unknown:
        raise UserError(f"{folder}: unknown tensor(s) {', '.join(unknown[:5])}; recpre has no parameter for them.")
    if files:
        missing = sorted(n for n in expected if n not in files)
        if missing:
            raise UserError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}.")
        if "lm_head.weight" in files:
            expected_head = {"lm_head.weight": torch.Size([config.padded_vocab_size, config.n_embd])}
        else:
            expected_head = {}
        by_file: dict[Path, list[str]] = {}
        for name in [*expected, *expected_head]:
            by_file.setdefault(files[name], []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    shape = torch.Size(f.get_slice(name).get_shape())
                    want = expected.get(name, expected_head.get(name))
                    if shape != want:
                        raise UserError(f"{file}: tensor {name} has shape {list(shape)}, expected {list(want)}.")
    if torch.device(device).type == "meta":
        return meta

    state: dict[str, torch.Tensor] = {}
    head = None
    by_file = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                if name in _DERIVED_TENSORS:
                    continue
                tensor = f.get_tensor(name).to(dtype)
                if name == "lm_head.weight" and config.tie_embeddings:
                    head = tensor
                else:
                    state[name] = tensor
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise UserError(f"{folder}: lm_head.weight differs from transformer.wte.weight but tie_embeddings is true.")
    meta.load_state_dict(state, strict=True, assign=True)
    return meta


def to_huginn(model: RecurrentGPT, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a Huginn folder (config.json + model.safetensors); files appear only when complete."""
    folder = Path(path)
    hf_config = model_config_to_huginn_config(model.config)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.detach()
        tensors[name] = (t if dtype is None else t.to(dtype)).contiguous().cpu()
    if model.config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    first = next(iter(tensors.values()))
    hf_config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        Path(tmp, "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        os.replace(os.path.join(tmp, "model.safetensors"), folder / "model.safetensors")
        os.replace(os.path.join(tmp, "config.json"), folder / "config.json")
