"""What a run tells the outside world: progress on the console, metrics.jsonl, wandb, a loss plot.

Only the main rank writes or prints; other ranks get a Monitor that does nothing, so the loop never has
to ask. metrics.jsonl is the record of truth (one JSON object per line); everything else is a view of it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from recpre.errors import UserError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
WANDB_ID_FILE = "wandb_run_id"


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _finite_or_none(x: Any) -> Any:
    """JSON has no NaN/inf: write null so every line parses with any reader."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class Throughput:
    """Tokens per second over the window since the last `rate()` call (excludes validation/checkpoints)."""

    def __init__(self) -> None:
        self._tokens = 0
        self._seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> None:
        if self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
            self._tokens += tokens
            self._t0 = None

    def rate(self) -> tuple[float, float]:
        """(tokens/s, seconds) over the window, then start a new window."""
        tokens, seconds = self._tokens, self._seconds
        self._tokens, self._seconds = 0, 0.0
        return (tokens / seconds if seconds > 0 else 0.0), seconds


class Monitor:
    """Console progress (tqdm bar on a terminal, plain lines otherwise), metrics.jsonl and optional wandb."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        log_settings: Any,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        run_name: str = "run",
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._bar = None
        self._wandb = None
        self._last_step: int | None = None
        self._last_time = 0.0
        self._step_time: float | None = None
        self.last_train: dict[str, Any] = {}
        self.last_val: dict[str, Any] = {}
        self.first_val: dict[str, Any] = {}
        if not enabled:
            return
        mode = getattr(log_settings, "progress", "auto")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._metrics = None
        if self.run_dir is not None:
            path = self.run_dir / METRICS_FILE
            if start_step > 0:
                truncate_metrics(path, start_step)
            # A fresh start replaces rows left by an earlier attempt that died before its first checkpoint.
            mode = "a" if start_step > 0 else "w"
            self._metrics = open(path, mode, encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
        wandb_settings = getattr(log_settings, "wandb", None)
        if wandb_settings is not None and getattr(wandb_settings, "mode", "disabled") != "disabled":
            self._wandb = _start_wandb(wandb_settings, run_name, self.run_dir, config)

    # -- writing -----------------------------------------------------------------------------------------

    def _write(self, row: dict[str, Any]) -> None:
        if self._metrics is not None:
            clean = {k: _finite_or_none(v) for k, v in row.items()}
            self._metrics.write(json.dumps(clean, default=_json_default) + "\n")
            self._metrics.flush()

    def print(self, text: str) -> None:
        if not self.enabled or self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def train(self, row: dict[str, Any], *, show: bool = True) -> None:
        """A training row (step, tokens, loss, lr, grad_norm, tokens_per_s, ...)."""
        if not self.enabled:
            return
        self.last_train = row
        self._write(row)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        if self._bar is not None:
            self._bar.n = row["step"]
            self._bar.set_postfix(
                loss=f"{row['loss']:.4f}", tok_s=_fmt_rate(row.get("tokens_per_s", 0.0)), refresh=False
            )
            self._bar.refresh()
        elif show and self.mode == "lines":
            self.print(self._line(row))

    def _eta(self, step: int) -> str:
        """Remaining time from a moving average of the time between steps (validation pauses included)."""
        now = time.perf_counter()
        if self._last_step is not None and step > self._last_step:
            per_step = (now - self._last_time) / (step - self._last_step)
            self._step_time = per_step if self._step_time is None else 0.8 * self._step_time + 0.2 * per_step
        self._last_step, self._last_time = step, now
        if self._step_time is None:
            return "?"
        return _fmt_duration(self._step_time * (self.total_steps - step))

    def _line(self, row: dict[str, Any]) -> str:
        step = row["step"]
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {row['loss']:.4f}",
            f"lr {row['lr']:.2e}",
            f"grad {row['grad_norm']:.3f}",
            f"{_fmt_rate(row.get('tokens_per_s', 0.0))} tok/s",
        ]
        if row.get("mfu") is not None:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        parts.append(f"eta {self._eta(step)}")
        return " | ".join(parts)

    def validation(self, row: dict[str, Any]) -> None:
        """A validation row (step, val_loss, val_loss_<depth>, val_ppl)."""
        if not self.enabled:
            return
        if not self.first_val:
            self.first_val = row
        self.last_val = row
        self._write(row)
        if self._wandb is not None:
            self._wandb.log({f"val/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        depths = " ".join(f"{k[len('val_loss_') :]}:{v:.3f}" for k, v in row.items() if k.startswith("val_loss_"))
        self.print(f"validation step {row['step']} | val_loss {row['val_loss']:.4f} | ppl {row['val_ppl']:.1f}")
        if depths:
            self.print(f"  val_loss by depth  {depths}")

    def event(self, name: str, **fields: Any) -> None:
        """A non-metric row, e.g. {"event": "skipped_step"} or the final {"event": "finished"}."""
        if not self.enabled:
            return
        self._write({"event": name, **fields})

    def run_validation_summary(self) -> dict[str, Any]:
        """First/last validation loss of the whole run so far (every segment), from metrics.jsonl."""
        if not self.enabled or self.run_dir is None:
            return {}
        return validation_summary(self.run_dir / METRICS_FILE)

    def close(self, summary: dict[str, Any] | None = None, *, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        wrote = self._metrics is not None
        if wrote:
            self._metrics.close()
            self._metrics = None
        if summary:
            self.print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        if wrote and plot and not _importable("matplotlib"):
            self.print(f'{PLOT_FILE} not written: matplotlib is not installed (pip install -e ".[plot]")')
        elif wrote and plot:
            out = plot_losses(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE)
            if out is not None:
                self.print(f"wrote {out}")
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update(summary)
            self._wandb.finish()
            self._wandb = None


def _importable(name: str) -> bool:
    """Whether an optional package imports here (installed and not broken)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def require_logging_extras(log_settings: Any) -> None:
    """Refuse, before a run folder exists, logging that needs a package this installation lacks."""
    mode = getattr(getattr(log_settings, "wandb", None), "mode", "disabled")
    if mode != "disabled" and not _importable("wandb"):
        raise UserError(
            f'log.wandb.mode is "{mode}" but wandb is not installed; pip install -e ".[wandb]" '
            "or set log.wandb.mode=disabled"
        )


def wandb_run_id(run_dir: Path | None) -> str:
    """A wandb run id unique to this run folder and the same for every segment that resumes it: drawn once
    and kept in RUN/wandb_run_id (the run name would merge two experiments that share a name)."""
    fresh = secrets.token_hex(8)
    if run_dir is None:
        return fresh
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path.read_text(encoding="utf-8").strip()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(fresh + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return fresh


def _start_wandb(wandb_settings: Any, run_name: str, run_dir: Path | None, config: dict | None) -> Any:
    require_logging_extras(SimpleNamespace(wandb=wandb_settings))
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode=wandb_settings.mode,
        project=wandb_settings.project,
        entity=getattr(wandb_settings, "entity", None),
        name=run_name,
        id=wandb_run_id(run_dir),
        resume="allow",
        dir=str(run_dir) if run_dir is not None else None,
        config=config,
    )
    return run


def validation_summary(path: Path) -> dict[str, Any]:
    """First and last validation loss of the whole run (all its segments), from its metrics file, with the
    step of the last one: a segment that stopped between validations reports the run's figures, not its own."""
    rows = [r for r in read_metrics(path) if "val_loss" in r and "event" not in r]
    if not rows:
        return {}
    return {
        "initial_val_loss": round(rows[0]["val_loss"], 4),
        "final_val_loss": round(rows[-1]["val_loss"], 4),
        "final_val_step": rows[-1]["step"],
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    if not Path(path).exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows a resumed run will write again (step > the checkpoint's step, and events after it)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for row in read_metrics(path):
        if "step" in row and row["step"] > step:
            continue
        if row.get("event") == "finished":
            continue
        kept.append(row)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Training and validation loss against tokens, as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and r.get("loss") is not None]
    val = [(r.get("tokens", r["step"]), r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
