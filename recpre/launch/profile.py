"""Cluster profiles: YAML files in launchers/clusters/ that say how a cluster runs a job.

A profile is data, validated here so that a typo fails at submit time with the file and field named,
not hours later in a queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recpre.errors import UserError
from recpre.launch.secrets import is_secret_name

PROFILE_DIR = Path(__file__).resolve().parents[2] / "launchers" / "clusters"

EXECUTORS = ("slurm", "local")
LAUNCH_STYLES = ("task-per-device", "torchrun-per-node")
REQUIRED = ("description", "executor", "launch", "devices_per_node", "sbatch", "setup", "env")
OPTIONAL = (
    "device_memory_gib",
    "srun_args",
    "nodes",
    "time",
    "python",
    "signal_before_end_s",
    "master_port",
    "precompile",
)
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$|^\d+$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The launcher writes these itself from the job; a profile setting them would be silently overridden.
_RESERVED_SBATCH = {"nodes", "time", "job-name", "output", "error", "open-mode", "signal", "array", "dependency"}


@dataclass(frozen=True)
class Precompile:
    """Neuron graph pre-compilation: `train.py --compile-sweep` under `neuron_parallel_compile`, chained before
    the run; the sweep visits every graph the run will need (recpre/xla.py)."""

    enabled: bool = False
    time: str = "02:00:00"
    command: str = "neuron_parallel_compile"


@dataclass(frozen=True)
class ClusterProfile:
    """One cluster: sbatch parameters, setup lines, environment, launch style, devices per node."""

    name: str
    path: Path
    description: str
    executor: str
    launch: str
    devices_per_node: int
    sbatch: dict[str, Any]
    setup: list[str]
    env: dict[str, str]
    srun_args: list[str] = field(default_factory=list)
    nodes: int = 1
    time: str = "01:00:00"
    python: str | None = None  # None: the submitting interpreter (local), `python` from PATH (SLURM)
    signal_before_end_s: int = 120
    master_port: int = 29500
    precompile: Precompile = field(default_factory=Precompile)
    device_memory_gib: float | None = None  # memory of one device: submit refuses a job whose plan exceeds it


def available_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_profile_path(name_or_path: str, directory: Path = PROFILE_DIR) -> Path:
    """A profile is named (`frontier`) or given as a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or "/" in name_or_path:
        if not candidate.is_file():
            raise UserError(f"cluster profile file {name_or_path} does not exist; check --cluster")
        return candidate
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(directory)) or "none"
        raise UserError(f"unknown cluster profile {name_or_path!r}; use --cluster with one of: {known}")
    return path


def _bad(path: Path, key: str, why: str) -> UserError:
    return UserError(f"cluster profile {path}: field {key!r} {why}")


def _check_int(path: Path, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(path, key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_time(value: Any, where: str) -> str:
    """SLURM time limits as [D-]HH:MM:SS or minutes; returns the string form."""
    text = str(value)
    if isinstance(value, bool) or not _TIME.match(text):
        raise UserError(f"{where} must be a SLURM time like 12:00:00, 1-00:00:00 or minutes, got {value!r}")
    return text


def time_to_minutes(text: str) -> int:
    """Minutes in a SLURM time string (for submitit's `timeout_min`); rounds seconds up."""
    if text.isdigit():
        return int(text)
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    h, m, s = (int(x) for x in text.split(":"))
    return days * 24 * 60 + h * 60 + m + (1 if s else 0)


def _check_sbatch(path: Path, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad(path, "sbatch", "must be a mapping of sbatch long options to values (or {})")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _SBATCH_KEY.match(key):
            raise _bad(path, f"sbatch.{key}", "is not an sbatch long option name (like cpus-per-task)")
        if key in _RESERVED_SBATCH:
            raise _bad(path, f"sbatch.{key}", "is set by the launcher from the command line; remove it")
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise _bad(path, f"sbatch.{key}", "must be a string, a number, true (flag) or null")
        out[key] = value
    return out


def _check_env(path: Path, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise _bad(path, "env", "must be a mapping of variable names to values (or {})")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise _bad(path, f"env.{key}", "is not a valid environment variable name")
        if is_secret_name(key):
            raise _bad(path, f"env.{key}", "looks like a secret; export it in your shell instead (sbatch passes it on)")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _bad(path, f"env.{key}", "must be a string or a number")
        out[key] = str(value)
    return out


def _check_lines(path: Path, key: str, raw: Any) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise _bad(path, key, "must be a list of strings (or [])")
    return list(raw)


def _check_precompile(path: Path, raw: Any) -> Precompile:
    if raw is None:
        return Precompile()
    if not isinstance(raw, dict):
        raise _bad(path, "precompile", "must be a mapping with enabled, time, command")
    unknown = set(raw) - {"enabled", "time", "command"}
    if unknown:
        raise _bad(path, f"precompile.{sorted(unknown)[0]}", "is not a known field")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise _bad(path, "precompile.enabled", "must be true or false")
    return Precompile(
        enabled=enabled,
        time=check_time(raw.get("time", "02:00:00"), f"cluster profile {path}: field 'precompile.time'"),
        command=str(raw.get("command", "neuron_parallel_compile")),
    )


def parse_profile(raw: Any, path: Path) -> ClusterProfile:
    """Validate a loaded YAML mapping; every problem names the file and the field."""
    if not isinstance(raw, dict):
        raise UserError(f"cluster profile {path} must be a YAML mapping of fields")
    for key in REQUIRED:
        if key not in raw:
            raise _bad(path, key, "is missing")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise _bad(path, unknown[0], f"is not a known field (known: {', '.join(REQUIRED + OPTIONAL)})")
    if raw["executor"] not in EXECUTORS:
        raise _bad(path, "executor", f"must be one of {', '.join(EXECUTORS)}, got {raw['executor']!r}")
    if raw["launch"] not in LAUNCH_STYLES:
        raise _bad(path, "launch", f"must be one of {', '.join(LAUNCH_STYLES)}, got {raw['launch']!r}")
    if not isinstance(raw["description"], str) or not raw["description"].strip():
        raise _bad(path, "description", "must be a non-empty string")
    python = raw.get("python")
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise _bad(path, "python", "must be a command name or path")
    return ClusterProfile(
        name=path.stem,
        path=path,
        description=raw["description"].strip(),
        executor=raw["executor"],
        launch=raw["launch"],
        devices_per_node=_check_int(path, "devices_per_node", raw["devices_per_node"]),
        sbatch=_check_sbatch(path, raw["sbatch"]),
        setup=_check_lines(path, "setup", raw["setup"]),
        env=_check_env(path, raw["env"]),
        srun_args=_check_lines(path, "srun_args", raw.get("srun_args", [])),
        nodes=_check_int(path, "nodes", raw.get("nodes", 1)),
        time=check_time(raw.get("time", "01:00:00"), f"cluster profile {path}: field 'time'"),
        python=python,
        signal_before_end_s=_check_int(path, "signal_before_end_s", raw.get("signal_before_end_s", 120), 0),
        master_port=_check_int(path, "master_port", raw.get("master_port", 29500)),
        precompile=_check_precompile(path, raw.get("precompile")),
        device_memory_gib=_check_memory(path, raw.get("device_memory_gib")),
    )


def _check_memory(path: Path, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad(path, "device_memory_gib", f"must be a positive number of GiB, got {value!r}")
    return float(value)


def load_profile(name_or_path: str, directory: Path = PROFILE_DIR) -> ClusterProfile:
    """Load and validate a cluster profile by name (launchers/clusters/NAME.yaml) or path."""
    path = resolve_profile_path(name_or_path, directory)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"cluster profile {path} is not valid YAML: {err}") from err
    return parse_profile(raw, path)
