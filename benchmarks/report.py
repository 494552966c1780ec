"""The fixed format of a benchmark report, and the one-line protocol a bench script uses to hand over its figures.

A bench script prints its usual human output plus, anywhere on stdout, lines of the form

    BENCH_FIGURES {"bench": "train", "figures": [{"name": "tokens/s", "value": 1234.5, "unit": "tok/s"}]}

(`emit_figures` writes one). `run_all.py` collects those lines into the report's table of figures and copies the
markdown tables a script prints, so a script that emits no JSON still shows up with its own tables. The report
(`benchmarks/results/<date>_<device>.md`) always has the same sections: header (date, device, versions, load,
command), summary (one row per bench: status, wall time, exact command), figures, then each bench's tables.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FIGURES_PREFIX = "BENCH_FIGURES "
REPO = Path(__file__).resolve().parent.parent


def emit_figures(bench: str, figures: list[dict[str, Any]], file: Any = None) -> None:
    """Print one BENCH_FIGURES line: each figure is {"name", "value", "unit"} plus optional "note"."""
    clean = []
    for f in figures:
        row = {"name": str(f["name"]), "value": f["value"], "unit": str(f.get("unit", ""))}
        if f.get("note"):
            row["note"] = str(f["note"])
        clean.append(row)
    print(FIGURES_PREFIX + json.dumps({"bench": bench, "figures": clean}), file=file or sys.stdout, flush=True)


def parse_figures(stdout: str) -> list[dict[str, Any]]:
    """Every figure of every BENCH_FIGURES line in a script's output (malformed lines are skipped)."""
    figures: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if not line.startswith(FIGURES_PREFIX):
            continue
        try:
            payload = json.loads(line[len(FIGURES_PREFIX) :])
        except json.JSONDecodeError:
            continue
        for f in payload.get("figures", []):
            if isinstance(f, dict) and "name" in f and "value" in f:
                figures.append({"bench": payload.get("bench", ""), **f})
    return figures


def extract_tables(stdout: str) -> list[str]:
    """Markdown tables (runs of lines starting with '|') in a script's output, in order."""
    tables, current = [], []
    for line in stdout.splitlines():
        if line.lstrip().startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return [t for t in tables if t.count("\n") >= 2]  # header, rule and at least one row


@dataclass
class BenchResult:
    """What one bench script did under run_all."""

    name: str
    command: list[str]
    status: str  # "ok" | "failed" | "timeout" | "skipped"
    wall_s: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    note: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' (uncommitted changes)' if dirty else ''}" if sha else "unknown"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment() -> dict[str, Any]:
    """Device and versions of this machine, as the report header shows them."""
    import torch

    env: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": f"{_cpu_name()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpus": [],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["versions"]["cuda"] = torch.version.cuda or torch.version.hip or "?"
        env["versions"]["cudnn"] = str(torch.backends.cudnn.version())
        driver = _nvidia_driver()
        if driver:
            env["versions"]["nvidia driver"] = driver
    for module in ("numpy", "pyarrow", "tokenizers", "triton", "flash_attn", "torch_xla"):
        v = _version(module)
        if v is not None:
            env["versions"][module] = v
    return env


def device_slug(env: dict[str, Any]) -> str:
    """Short device name for the report file name: h100, h200, a100, ... or cpu."""
    if not env.get("gpus"):
        return "cpu"
    name = env["gpus"][0].lower()
    for key in ("h200", "h100", "a100", "mi300x", "mi250x", "l40s", "a10g"):
        if key in name.replace(" ", ""):
            return key
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def report_path(results_dir: Path, env: dict[str, Any]) -> Path:
    return Path(results_dir) / f"{env['date'][:10]}_{device_slug(env)}.md"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_output(lines: list[str], max_lines: int = 120) -> list[str]:
    """A bench's stdout as markdown: tables kept (header-less ones fenced), headings demoted under the bench's
    own section, every other line a bullet (so lines do not run together). Long outputs keep only the tables."""
    out: list[str] = []
    if len(lines) > max_lines:
        lines = [ln for ln in lines if ln.lstrip().startswith("|") or not ln.strip()]
    block: list[str] = []

    def flush() -> None:
        if not block:
            return
        headed = len(block) > 1 and re.fullmatch(r"\|(:?-+:?\|)+", block[1].replace(" ", "")) is not None
        out.extend(["", *block, ""] if headed else ["", "```", *block, "```", ""])
        block.clear()

    for ln in lines:
        text = ln.rstrip()
        if text.lstrip().startswith("|"):
            block.append(text.strip())
            continue
        flush()
        if not text.strip():
            continue
        if text.startswith("#"):
            out += ["", "### " + text.lstrip("#").strip(), ""]
        elif text.lstrip().startswith(("- ", "* ")):
            out.append(text.strip())
        else:
            out.append("- " + text.strip())
    flush()
    return [*out, ""]


def render_report(
    env: dict[str, Any], results: list[BenchResult], *, scale: str, command: str, wall_s: float, notes: list[str]
) -> str:
    """The report markdown: header, summary, figures, per-bench tables, notes. Same sections every time."""
    device = ", ".join(env["gpus"]) if env["gpus"] else f"CPU only ({env['host_cpu']})"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    load = f"{env['load']:.1f} at start, {load_end:.1f} at end" if env.get("load") is not None else "n/a"
    lines = [
        f"# recpre benchmarks: {device_slug(env)}, {scale} ({env['date'][:10]})",
        "",
        f"- date: {env['date']}",
        f"- device: {device}",
        f"- host: {env['host_cpu']}, {env['torch_threads']} torch threads",
        f"- versions: {versions}",
        f"- commit: {env['commit']}",
        f"- load average (1 min): {load}",
        f"- command: `{command}` ({scale} scale, {wall_s / 60:.1f} min wall in all)",
        "",
        "## Summary",
        "",
        "| bench | status | wall s | command |",
        "|---|---|---|---|",
    ]
    for r in results:
        status = r.status if not r.note else f"{r.status}: {r.note}"
        lines.append(f"| {r.name} | {_cell(status)} | {r.wall_s:.0f} | `{_cell(' '.join(r.command))}` |")
    lines += ["", "## Figures", ""]
    figures = [f for r in results for f in r.figures]
    if figures:
        lines += ["| bench | figure | value | unit | note |", "|---|---|---|---|---|"]
        for f in figures:
            lines.append(
                f"| {_cell(f.get('bench', ''))} | {_cell(f['name'])} | {_fmt_value(f['value'])} | "
                f"{_cell(f.get('unit', ''))} | {_cell(f.get('note', ''))} |"
            )
    else:
        lines.append("No bench printed BENCH_FIGURES lines; see the tables below.")
    for r in results:
        lines += ["", f"## {r.name}", "", f"`{' '.join(r.command)}`: {r.status}, {r.wall_s:.0f} s", ""]
        plain = [ln for ln in r.stdout.splitlines() if not ln.startswith(FIGURES_PREFIX)]
        if r.status in ("failed", "timeout"):
            tail = "\n".join(("\n".join(plain) + "\n" + r.stderr).strip().splitlines()[-15:])
            lines += ["Output tail:", "", "```", tail, "```", ""] if tail else []
        else:
            lines += format_output(plain)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"
