"""Plots of a depth sweep: each metric against test-time recurrence, one PNG per task and metric."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recpre.errors import UserError


def plot_sweep(results: dict[str, Any], out_prefix: str | Path) -> list[Path]:
    """Write `<out_prefix>_<task>_<metric>.png` for every metric of a sweep over two or more depths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise UserError("plots need matplotlib; install the plot extra: pip install 'recpre[plot]'") from err
    depths = [int(d) for d in results["results"]]
    if len(depths) < 2:
        return []
    written = []
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    for task in results["tasks"]:
        metrics = sorted({m for d in results["results"].values() for m in d.get(task, {}) if not m.endswith("_stderr")})
        for metric in metrics:
            xs, ys, errs = [], [], []
            for d, per_task in zip(depths, results["results"].values()):
                value = per_task.get(task, {}).get(metric)
                if value is None:
                    continue
                xs.append(d)
                ys.append(value)
                err = per_task.get(task, {}).get(f"{metric}_stderr")
                errs.append(err if isinstance(err, float) and err == err else 0.0)
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("recurrence depth (num_steps)")
            ax.set_ylabel(metric)
            ax.set_title(f"{task}: {metric}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out_prefix.parent / f"{out_prefix.name}_{task}_{metric}.png"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
            fig.savefig(tmp, dpi=100)
            plt.close(fig)
            os.replace(tmp, path)
            written.append(path)
    return written
