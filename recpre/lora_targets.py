"""Which linear layers LoRA adapts, named by the model's own structure: `STAGE[.PART[.PROJ]]`.

STAGE is `prelude`, `core` or `coda` (a recurrent model) or `blocks` (a GPT's `transformer.h`); PART is `attn`
(projections `Wqkv`, `proj`) or `mlp` (`fc`, `proj`). Shorthands: `all` (every attention and MLP projection),
`attn` and `mlp` (that part in every stage). `injection` is the recurrent model's linear adapter that mixes the
state with the embedded input (`transformer.adapter`). Kept free of torch and peft so that settings validation
can check the names before anything is built.
"""

from __future__ import annotations

from collections.abc import Iterable

from recpre.errors import UserError

# target stage -> module path prefix of its blocks (block index follows)
STAGES = {
    "prelude": "transformer.prelude",
    "core": "transformer.core_block",
    "coda": "transformer.coda",
    "blocks": "transformer.h",
}
PROJECTIONS = {"attn": ("Wqkv", "proj"), "mlp": ("fc", "proj")}
INJECTION = "transformer.adapter"
SHORTHANDS = ("all", "attn", "mlp", "injection")


def valid_targets() -> list[str]:
    names = list(SHORTHANDS)
    for stage in STAGES:
        names.append(stage)
        for part, projections in PROJECTIONS.items():
            names.append(f"{stage}.{part}")
            names.extend(f"{stage}.{part}.{proj}" for proj in projections)
    return names


def check_targets(targets: Iterable[str], key: str = "model.lora.targets") -> None:
    """Refuse an unknown target name, listing the valid ones."""
    valid = valid_targets()
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise UserError(f"{key} names unknown target {unknown[0]!r}; valid targets are {', '.join(valid)}")


def _suffixes(target: str) -> tuple[list[str], list[str]]:
    """(stages, `PART.PROJ` suffixes) that one target name selects."""
    every = [f"{part}.{proj}" for part, projs in PROJECTIONS.items() for proj in projs]
    if target in ("all", "attn", "mlp"):
        return list(STAGES), [s for s in every if target == "all" or s.startswith(target + ".")]
    stage, _, rest = target.partition(".")
    return [stage], [s for s in every if not rest or s == rest or s.startswith(rest + ".")]


def resolve_targets(targets: Iterable[str], module_names: Iterable[str]) -> list[str]:
    """The full module paths (as in `model.named_modules()`) that `targets` select, in model order; a target
    that selects nothing in this model (e.g. `core` on a GPT) is refused."""
    names = list(module_names)
    chosen: set[str] = set()
    for target in targets:
        check_targets([target])
        if target == "injection":
            found = [INJECTION] if INJECTION in names else []
        else:
            stages, suffixes = _suffixes(target)
            found = []
            for name in names:
                for stage in stages:
                    prefix = STAGES[stage] + "."
                    if name.startswith(prefix) and any(
                        name == f"{prefix}{name[len(prefix) :].split('.', 1)[0]}.{s}" for s in suffixes
                    ):
                        found.append(name)
        if not found:
            raise UserError(
                f"model.lora.targets entry {target!r} selects no layer of this model; "
                f"this model has the stages {', '.join(s for s in STAGES if any(n.startswith(STAGES[s] + '.') for n in names))}"
            )
        chosen.update(found)
    return [n for n in names if n in chosen]


def core_stage_prefix() -> str:
    """The path prefix of the looped core's blocks (per-iteration adapters live there)."""
    return STAGES["core"] + "."
