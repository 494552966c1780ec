"""Where settings come from: YAML files (with `base:` chains), `key=value` command-line overrides, environment
interpolation, and where each key was last set, so that an error can name the file or override to change.

recpre/settings.py checks what these layers hold against the Settings dataclass tree and validates the result.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf.errors import OmegaConfBaseException

from recpre.errors import UserError

DEFAULTS_SOURCE = "the defaults in recpre/settings.py"
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "AUTH", "CREDENTIAL", "COOKIE")


# --------------------------------------------------------------------------------------------------------------
# YAML reading


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: SafeLoader reports it itself
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def read_yaml(path: Path) -> dict:
    shown = display_path(path)
    if not path.is_file():
        raise UserError(f"config file {shown} does not exist (check --config or the `base:` key pointing to it).")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            where += f" ({context} from line {context_mark.line + 1})"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {shown} is not valid YAML{where}: {problem}.") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {shown} is not UTF-8 text.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {shown} must hold a mapping of sections (run:, model:, ...), got {data!r}.")
    return data


def read_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The file and its `base:` ancestors as (shown name, mapping), root ancestor first."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(display_path(p) for p in (*stack, path))
        raise UserError(f"`base:` in {display_path(stack[-1])} forms a cycle ({cycle}); remove one of the base keys.")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(display_path(path), data)]
    if not isinstance(base, str) or not base:
        raise UserError(f"`base:` in {display_path(path)} must be a path to another YAML file, got {base!r}.")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        raise UserError(
            f"`base: {base}` in {display_path(path)} points to {display_path(base_path)}, which does not exist "
            "(base paths are relative to the YAML's folder)."
        )
    return [*read_chain(base_path, (*stack, path)), (display_path(path), data)]


def flatten(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys += flatten(value, f"{full}.")
    return keys


class Origins:
    """Where each key was last set, so an error can name the file (or the override) to change."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.layers: dict[str, int] = {}  # key -> index of the layer that set it last (defaults: -1)
        self.notes: list[str] = []  # adjustments made while loading, for the driver to print
        self._count = 0

    def record(self, data: dict, source: str, *, layer: int | None = None) -> None:
        """Keys set by `source`; each file is its own layer, the command line's overrides are one layer."""
        if layer is None:
            self._count += 1
        for key in flatten(data):
            self.sources[key] = source
            self.layers[key] = self._count if layer is None else layer

    def next_layer(self) -> int:
        return self._count + 1

    def layer(self, key: str) -> int:
        return self.layers.get(key, -1)

    def __call__(self, key: str) -> str:
        key = re.sub(r"\[\d+\]", "", key)
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return DEFAULTS_SOURCE


def first_line(err: OmegaConfBaseException) -> str:
    return (getattr(err, "msg", None) or str(err)).splitlines()[0].rstrip(".")


def protect_interpolations(text: str) -> tuple[str, list[str]]:
    """Swap each `${...}` for a plain token, so YAML flow lists like `[${oc.env:D}/a, b]` parse."""
    out, spans, i = [], [], 0
    while i < len(text):
        start = text.find("${", i)
        if start < 0 or (start > 0 and text[start - 1] == "\\"):
            stop = len(text) if start < 0 else start + 2
            out.append(text[i:stop])
            i = stop
            continue
        depth, j = 0, start + 1
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        out.append(text[i:start] + f"RECPREINTERP{len(spans)}X")
        spans.append(text[start:j])
        i = j
    return "".join(out), spans


def restore_interpolations(value: Any, spans: list[str]) -> Any:
    if isinstance(value, str):
        return re.sub(r"RECPREINTERP(\d+)X", lambda m: spans[int(m.group(1))], value)
    if isinstance(value, list):
        return [restore_interpolations(v, spans) for v in value]
    if isinstance(value, dict):
        return {k: restore_interpolations(v, spans) for k, v in value.items()}
    return value


def parse_override(item: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as YAML (`[1, 2]`, `null`, `3e-4`)."""
    source = f"command-line override '{item}'"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise UserError(f"{source} must look like section.key=value (e.g. optim.lr=3e-4).")
    protected, spans = protect_interpolations(raw)
    try:
        value = restore_interpolations(yaml.load(protected, Loader=YamlLoader), spans)
    except yaml.YAMLError as err:
        if raw.lstrip().startswith(("[", "{", '"', "'")):
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{source} has a value that is not valid YAML: {problem}.") from None
        value = raw  # e.g. `run.name=a: b` is meant as a plain string
    parsed: dict = {}
    node = parsed
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return parsed


# --------------------------------------------------------------------------------------------------------------
# Interpolation


ENV_RE = re.compile(r"\$\{oc\.env:\s*([^,}\s]+)\s*(,[^}]*)?\}")


def walk_strings(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{prefix}[{i}]")
    elif isinstance(node, str):
        yield prefix, node


def unset_marker(var: str) -> str:
    """What `--print-config` shows for a value read from an environment variable that is not set."""
    return f"<unset ${var}>"


def check_env(raw: dict, where: Origins, *, mark_missing: bool = False) -> dict[str, str]:
    """Refuses secrets read through ${oc.env:...}; a missing variable is an error, or (mark_missing) gets a
    stand-in value that names it, returned as {var: marker} for the caller to put in the environment."""
    missing: dict[str, str] = {}
    for key, text in walk_strings(raw):
        for match in ENV_RE.finditer(text):
            var, default = match.group(1), match.group(2)
            if any(marker in var.upper() for marker in SECRET_MARKERS):
                raise UserError(
                    f"{key} in {where(key)} reads the secret-looking variable {var} through ${{oc.env:{var}}}, "
                    "but secrets belong in the environment only and are never written into saved settings."
                )
            if default is None and var not in os.environ and mark_missing:
                if var not in missing:
                    where.notes.append(f"note: {var} is not set; values that use it show {unset_marker(var)}")
                missing[var] = unset_marker(var)
            elif default is None and var not in os.environ:
                raise UserError(
                    f"{key} in {where(key)} uses ${{oc.env:{var}}} but the environment variable {var} is not set "
                    f"(export it, or give a default as ${{oc.env:{var},DEFAULT}})."
                )
    return missing
