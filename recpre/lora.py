"""LoRA on a frozen base through peft (docs/lora.md): injecting the adapters into recpre's own model (its class
and the base's parameter names stay; peft adds `.base_layer` and `lora_A/lora_B.<adapter>`), per-iteration
adapters for the looped core, what a LoRA checkpoint holds (the adapters and the base's identity), and merging.

peft is imported lazily: it is the `lora` extra. The model knows nothing of peft: the per-iteration choice is made
by forward pre-hooks on the core blocks, which read the iteration from the block's cache key `("core", step, i)`
and so run again, with the same step, when activation checkpointing recomputes a block in backward.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recpre.errors import UserError, missing_extra
from recpre.lora_targets import core_stage_prefix, resolve_targets
from recpre.unwrap import is_adapter_key, plain_parameter_name, unwrap_model

if TYPE_CHECKING:
    from recpre.sharding import InitParameter

SHARED = "default"  # the adapter every stage uses (peft's default name)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise missing_extra("peft", "lora", "model.lora (LoRA)") from None
    return peft


def iteration_adapters(per_iteration: int) -> list[str]:
    """The core's adapters: one shared (per_iteration <= 1) or `iter0` .. `iter{m-1}`."""
    return [SHARED] if per_iteration <= 1 else [f"iter{i}" for i in range(per_iteration)]


def adapter_for_iteration(step: int, per_iteration: int) -> str:
    """Iteration `step` uses its own adapter among the first m, and the last one (`iter{m-1}`) after them."""
    return SHARED if per_iteration <= 1 else f"iter{min(step, per_iteration - 1)}"


def lora_layers(module: nn.Module) -> list[Any]:
    peft = _peft()
    return [m for m in module.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def init_adapter(name: str, tensor: torch.Tensor, seed: int) -> None:
    """Fill adapter `name` as peft's default init does (`lora_A` Kaiming-uniform with a = sqrt(5), `lora_B`
    zeros: the model's function is unchanged until training moves them), drawn from a generator of its own keyed
    by (seed, name): the same values on every rank, in any order, built on the meta device or not."""
    if ".lora_B." in name:
        nn.init.zeros_(tensor)
        return
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    full = torch.empty(tensor.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=torch.Generator().manual_seed(key))
    with torch.no_grad():
        tensor.copy_(full)


def apply_lora(model: nn.Module, lora: Any, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
    """Freeze `model` and inject the adapters `lora` (settings.model.lora) names, in place; only adapter
    parameters require gradients afterwards. Adapters start as `init_adapter(name, tensor, seed)` draws them.

    peft's own draws are discarded (they run inside `fork_rng`), so torch's RNG stream stays the base's: a
    meta-device build (fsdp, hsdp) then initialises the base shard by shard with the unsharded build's values,
    and its adapters with the values `lora_init_parameter` draws (the driver hands it to the fabric)."""
    peft = _peft()
    if lora.quantize is not None:
        quantize_base(model, lora, device)
    plain = unwrap_model(model)
    targets = resolve_targets(lora.targets, [name for name, _ in plain.named_modules()])
    core = [t for t in targets if t.startswith(core_stage_prefix())]
    if lora.per_iteration > 1 and not core:
        raise UserError(
            f"model.lora.per_iteration={lora.per_iteration} gives the looped core per-iteration adapters, but "
            f"model.lora.targets {list(lora.targets)} selects no core layer; add core (or core.attn, core.mlp) to "
            "the targets or set model.lora.per_iteration to 0"
        )
    shared = [t for t in targets if t not in core] if lora.per_iteration > 1 else targets
    groups = [(SHARED, shared)] if shared else []
    if lora.per_iteration > 1:
        groups += [(name, core) for name in iteration_adapters(lora.per_iteration)]
    for p in plain.parameters():
        p.requires_grad_(False)
    for name, modules in groups:
        config = peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules, bias="none"
        )
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # "Already found a peft_config": several adapters meant
            peft.inject_adapter_in_model(config, plain, adapter_name=name)
    for name, p in plain.named_parameters():
        p.requires_grad_(is_adapter_key(name))
        if is_adapter_key(name) and not p.is_meta:
            init_adapter(name, p.data, seed)
    for layer in lora_layers(plain):  # each layer's own adapter active, without touching requires_grad
        layer._active_adapter = next(iter(layer.lora_A.keys()))
    if lora.per_iteration > 1:
        _select_per_iteration(plain, lora.per_iteration)


def lora_init_parameter(model: nn.Module, seed: int) -> InitParameter:
    """What a sharding fabric draws each full parameter of a meta-device LoRA model with: adapters as
    `apply_lora(seed=seed)` draws them, everything else with the model's own `init_parameter` (which knows
    nothing of adapters)."""
    base_init = unwrap_model(model).init_parameter

    def init_parameter(name: str, tensor: torch.Tensor) -> None:
        if is_adapter_key(name):
            init_adapter(name, tensor, seed)
        else:
            base_init(name, tensor)

    return init_parameter


def _select_per_iteration(model: nn.Module, per_iteration: int) -> None:
    """Before a core block runs, activate its layers' adapter for this iteration (peft's `set_adapter` would
    flip requires_grad; setting `_active_adapter` does not)."""
    for block in model.recurrent_blocks():
        layers = lora_layers(block)
        if not layers:
            continue

        def choose(module: nn.Module, args: tuple, layers: list = layers) -> None:
            name = adapter_for_iteration(int(args[2][1]), per_iteration)  # key ("core", step, i)
            for layer in layers:
                layer._active_adapter = name

        block.register_forward_pre_hook(choose)


def quantize_base(model: nn.Module, lora: Any, device: torch.device | str) -> None:
    """QLoRA: the targeted base layers as 4-bit NF4 (bitsandbytes), on CUDA only."""
    if torch.device(device).type != "cuda":
        raise UserError(
            f"model.lora.quantize=4bit needs a CUDA GPU (bitsandbytes), but this run is on {torch.device(device)}; "
            "remove model.lora.quantize to train LoRA on an unquantized base"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise missing_extra("bitsandbytes", "qlora", "model.lora.quantize=4bit") from None
    plain = unwrap_model(model)
    for name in resolve_targets(lora.targets, [n for n, _ in plain.named_modules()]):
        parent_name, _, child = name.rpartition(".")
        parent, old = plain.get_submodule(parent_name), plain.get_submodule(name)
        new = bnb.nn.Linear4bit(
            old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=torch.bfloat16,
            quant_type="nf4",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new.to(device))


def trainable_line(model: nn.Module) -> str:
    """`trainable 5.01% (66,560 of 1,329,792 params)`: what a LoRA run trains, printed at its start."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {100 * trained / max(total, 1):.2f}% ({trained:,} of {total:,} params)"


def base_hash(model: nn.Module) -> str:
    """sha256 of the base weights (names without peft's `.base_layer`, adapters left out), in name order: what a
    LoRA checkpoint's adapters were trained on top of. A sharded model's weights are gathered one at a time (every
    rank calls this, in the same order), so it equals the unsharded model's hash."""
    digest = hashlib.sha256()
    state = unwrap_model(model).state_dict()
    for name in sorted(state, key=plain_parameter_name):
        if is_adapter_key(name):
            continue
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):  # a sharded (DTensor) weight, gathered alone: collective
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu().contiguous()
        digest.update(plain_parameter_name(name).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap_model(model).state_dict().items() if is_adapter_key(k)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base's state dict (its plain names) with every shared adapter merged into its weight by peft; the
    model is changed in place."""
    for layer in lora_layers(model):
        names = list(layer.lora_A.keys())
        if names != [SHARED]:
            raise UserError(
                f"{layer.__class__.__name__} holds the adapters {names}: several per-iteration adapters cannot be "
                "merged into one shared weight; use the LoRA checkpoint itself, or train with "
                "model.lora.per_iteration <= 1 to merge"
            )
        layer.merge(safe_merge=True, adapter_names=[SHARED])
    state = unwrap_model(model).state_dict()
    return {plain_parameter_name(k): v for k, v in state.items() if not is_adapter_key(k)}


class LoraAdapters:
    """The LoRA part of a run's checkpoints: the adapter tensors (the weights file holds only these) and the
    base's identity (where it came from and the hash of its weights), which a resume checks before it loads."""

    def __init__(self, model: nn.Module, lora: Any, base: dict[str, Any]) -> None:
        """`base["sha256"]` None: hashed on first use (a sharded run's base is final only after setup_model and
        run.init_from are through; then every rank gathers it, as every rank saves and restores)."""
        self.model, self.source = model, "?"
        self.value = {
            "settings": {
                "rank": lora.rank,
                "alpha": lora.alpha,
                "targets": list(lora.targets),
                "per_iteration": lora.per_iteration,
            },
            "base": dict(base),
        }

    def _base(self) -> dict[str, Any]:
        if self.value["base"]["sha256"] is None:
            self.value["base"]["sha256"] = base_hash(self.model)
        return self.value["base"]

    def state_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.value["settings"]), "base": dict(self._base())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse adapters trained on another base, or of another layout."""
        saved, now = state["base"], self._base()
        if saved["sha256"] != now["sha256"]:
            raise UserError(
                f"checkpoint {self.source} holds LoRA adapters trained on the base {saved.get('init_from')} "
                f"(sha256 {saved['sha256'][:12]}) but this run's base {now.get('init_from')} has other weights "
                f"(sha256 {now['sha256'][:12]}); set run.init_from to the base it was trained on"
            )
        if state["settings"] != self.value["settings"]:
            raise UserError(
                f"checkpoint {self.source} holds LoRA adapters with {state['settings']} but this run sets "
                f"model.lora to {self.value['settings']}; resume with the same model.lora"
            )

    def select(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter tensors of a full state dict: what the checkpoint's weights hold."""
        return {k: v for k, v in weights.items() if is_adapter_key(k)}

    def check(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of a full model, of adapters trained on another base, or of another layout."""
        if "lora" not in state:
            raise UserError(
                f"checkpoint {ckpt} holds a full model, not LoRA adapters; start a LoRA run from it with "
                f"run.init_from={ckpt} (and a new run.name)"
            )
        self.source = str(ckpt)
        self.load_state_dict(state["lora"])

    def read(self, ckpt: Path, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter tensors of `ckpt` (or `weights`, its weights already read), refused unless they are exactly
        this model's adapters."""
        return fitting_adapters(self.model, weights if weights is not None else read_adapters(ckpt), ckpt)


def read_adapters(source: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA checkpoint folder (its safetensors file, or a sharded run's DCP shards, in
    this process alone) or of a safetensors file."""
    from safetensors.torch import load_file

    from recpre.checkpoint import MODEL_FILE
    from recpre.sharded_checkpoint import is_sharded_checkpoint, model_weights

    source = Path(source)
    if source.is_dir():
        if is_sharded_checkpoint(source):
            return model_weights(source)
        source = source / MODEL_FILE
    return load_file(str(source))


def fitting_adapters(model: nn.Module, saved: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """`saved`, refused unless it names exactly the adapters of `model` (they load with strict=False beside the
    base, so nothing else would notice a missing one)."""
    expected = {name for name, _ in unwrap_model(model).named_parameters() if is_adapter_key(name)}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise UserError(
            f"adapters in {source} do not fit this model's LoRA layers (missing {missing[:3]}, extra {extra[:3]})"
        )
    return saved


def load_adapters(model: nn.Module, source: Path) -> None:
    """Adapter tensors (read_adapters' sources) into an unsharded model that has the same adapters."""
    saved = read_adapters(source)
    unwrap_model(model).load_state_dict(fitting_adapters(model, saved, source), strict=False)


def base_identity(model: nn.Module | None, init_from: str | None, loaded: Path | None, seed: int) -> dict[str, Any]:
    """Where the base came from (run.init_from and the file it resolved to, or a fresh init from `seed`) and the
    hash of its weights (None without a model); taken before the adapters are injected."""
    return {
        "init_from": init_from,
        "checkpoint": str(loaded) if loaded is not None else None,
        "seed": seed,
        "sha256": base_hash(model) if model is not None else None,
    }


def attach_lora(model: nn.Module, settings: Any, fabric: Any, loaded: Path | None) -> LoraAdapters | None:
    """A run's LoRA (settings.model.lora, rank > 0): the base's identity taken, the adapters injected, and what
    is trained and saved printed; None without LoRA. `loaded` is the file run.init_from resolved to."""
    lora = settings.model.lora
    if lora.rank == 0:
        return None
    init_from, seed = settings.run.init_from, settings.run.seed
    if fabric.builds_on_meta:  # sharded: the base is drawn and loaded after this; hashed on first use
        from recpre.weights import initial_weights_path

        loaded = initial_weights_path(init_from) if init_from else None
        identity = {**base_identity(None, init_from, loaded, seed), "sha256": None}
    else:
        identity = base_identity(model, init_from, loaded, seed)
    apply_lora(model, lora, device=fabric.device, seed=seed)
    adapters = adapter_state(model)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    full_bytes = sum(t.numel() * t.element_size() for t in unwrap_model(model).state_dict().values()) - adapter_bytes
    base = settings.run.init_from or f"a fresh init (seed {settings.run.seed})"
    fabric.print(
        f"LoRA rank {lora.rank} on {len(lora_layers(model))} layers of {base}: {trainable_line(model)}; "
        f"checkpoints hold the adapters only ({adapter_bytes / 2**10:.0f} KiB vs {full_bytes / 2**20:.1f} MiB "
        "of full weights)"
    )
    return LoraAdapters(model, lora, identity)


def merge_checkpoint(checkpoint: str | Path, out: str | Path, *, base: str | Path | None = None) -> Path:
    """Write OUT/checkpoints/step-N: the base of a LoRA checkpoint with its adapters merged in (peft's merge), a
    full checkpoint that generation, export, chat and run.init_from load like any other. `base` replaces the
    recorded run.init_from (a moved base); its weights must hash as recorded either way."""
    from recpre.checkpoint import (
        CHECKPOINTS_DIR,
        SETTINGS_FILE,
        load_state,
        read_model_config,
        resolve_checkpoint,
        save_checkpoint,
    )
    from recpre.config import ModelConfig
    from recpre.model import build_model
    from recpre.settings import load_settings, settings_to_yaml
    from recpre.weights import load_initial_weights

    folder, out = resolve_checkpoint(checkpoint), Path(out)
    state = load_state(folder)
    if "lora" not in state:
        raise UserError(f"checkpoint {folder} holds no LoRA adapters (it is a full model already); use it as it is")
    if (out / CHECKPOINTS_DIR).exists():
        raise UserError(f"--out {out} already holds checkpoints; choose a new folder")
    settings = load_settings(folder / SETTINGS_FILE, [])
    lora, recorded = settings.model.lora, state["lora"]["base"]
    if lora.per_iteration > 1:
        raise UserError(
            f"checkpoint {folder} has model.lora.per_iteration={lora.per_iteration}: several per-iteration adapters "
            "cannot be merged into one shared weight; use the LoRA checkpoint itself (resume or fine-tune it)"
        )
    config = ModelConfig.from_dict(read_model_config(folder))
    torch.manual_seed(int(recorded["seed"]))  # a fresh-init base is drawn as train.py drew it
    model = build_model(config, device="cpu")
    source = base
    if source is None:  # the exact file the run loaded, while it exists (init_from may name a newer one now)
        exact = recorded.get("checkpoint")
        source = exact if exact is not None and Path(exact).exists() else recorded["init_from"]
    if source is not None:
        load_initial_weights(model, source, config=config.to_dict())
    if base_hash(model) != recorded["sha256"]:
        raise UserError(
            f"the base {source or 'fresh init'} does not hold the weights the adapters of {folder} were trained on "
            f"(sha256 {recorded['sha256'][:12]}); pass the original base with --base PATH"
        )
    apply_lora(model, lora)
    load_adapters(model, folder)  # its safetensors file, or DCP shards of a sharded run
    weights = merged_state_dict(model)
    name = f"{settings.run.name}-merged"
    merged = load_settings(folder / SETTINGS_FILE, ["model.lora.rank=0", f"run.name={name}", f"run.out_dir={out}"])
    return save_checkpoint(
        out / CHECKPOINTS_DIR,
        int(state["step"]),
        model=weights,
        model_config=config.to_dict(),
        settings_yaml=settings_to_yaml(merged),
        state={"merged_from": str(folder.resolve())},
        rank_state={},
    )
