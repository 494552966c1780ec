"""Score a checkpoint with lm-eval at one or several recurrence depths (a depth sweep), fully offline by default.

Results are plain JSON-ready dicts:

    {"checkpoint": ..., "tasks": [...], "depths": [1, 4, 8],
     "results": {"4": {"recpre_next_line": {"acc": 0.41, "acc_stderr": 0.03, ...}, ...}, ...}}

Bundled tasks are built from the run's held-out split (recpre.eval.tasks); other names are lm-eval's own tasks,
whose datasets come from the Hugging Face Hub: without network they fail with one clear sentence unless the
datasets are already in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

from recpre.errors import UserError
from recpre.eval.tasks import BUNDLED_TASKS, TaskBuild

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HUB_HOST = ("huggingface.co", 443)


def parse_tasks(spec: str | list[str]) -> tuple[list[str], list[str]]:
    """(bundled task names, hub task names) from "bundled", "recpre_next_line", "hellaswag,arc_easy", ..."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise UserError("--tasks is empty; use bundled or a comma-separated list of lm-eval task names")
    bundled, hub = [], []
    for name in names:
        if name == "bundled":
            bundled.extend(t for t in BUNDLED_TASKS if t not in bundled)
        elif name in BUNDLED_TASKS:
            if name not in bundled:
                bundled.append(name)
        else:
            hub.append(name)
    return bundled, hub


def parse_depths(spec: str | list[int] | None) -> list[int | None]:
    """[None] (the model's default depth) or the listed positive integers, e.g. "1,4,8"."""
    if spec is None or spec == "" or spec == []:
        return [None]
    items = spec.split(",") if isinstance(spec, str) else spec
    depths = []
    for item in items:
        try:
            d = int(str(item).strip())
        except ValueError:
            raise UserError(f"--num-steps {spec!r}: use comma-separated positive integers such as 1,4,8") from None
        if d < 1:
            raise UserError(f"--num-steps {spec!r}: depths must be positive integers")
        if d not in depths:
            depths.append(d)
    return depths


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def set_offline() -> None:
    """No network access from datasets / huggingface_hub (also for modules already imported)."""
    os.environ.update(OFFLINE_ENV)
    with contextlib.suppress(Exception):
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    with contextlib.suppress(Exception):
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in task_result.items():
        if key in ("alias", "sample_len") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        out[key.split(",")[0]] = float(value)
    return out


def evaluate_model(
    model,
    tokenizer,
    *,
    tasks: str | list[str] = "bundled",
    depths: list[int | None] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    val_paths: list[str] | None = None,
    tokenizer_dir: str | Path | None = None,
    task_cache: str | Path | None = None,
    build: TaskBuild | None = None,
    state_init: str | None = "zero",
    quiet: bool = True,
    include_path: list[str] | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on a model at each depth; returns {"results": {depth: {task: {metric: value}}}, ...}.

    include_path: folders of task YAMLs (lm-eval's --include_path); tasks found there need no network."""
    bundled, hub = parse_tasks(tasks)
    depths = depths or [None]
    if not model.config.is_recurrent:
        depths = [None]  # a GPT has one depth
    include = [str(p) for p in include_path or []]
    hub = [t for t in hub if t not in _local_tasks(include)]
    local = [t for t in parse_tasks(tasks)[1] if t not in hub]
    online = bool(hub) and hub_reachable()
    if not online:
        set_offline()
    if bundled:
        from recpre.eval.tasks import build_bundled_tasks

        if val_paths is None or tokenizer_dir is None:
            raise ValueError("bundled tasks need val_paths and tokenizer_dir")
        include.append(str(build_bundled_tasks(val_paths, tokenizer_dir, cache_dir=task_cache, build=build)))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from recpre.eval.harness import RecpreLM

    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        logging.getLogger("lm-eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=include or None, include_defaults=bool(hub))
    unknown = [t for t in hub if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)}; use bundled or lm-eval task names")
    names = bundled + local + hub
    results: dict[str, Any] = {}
    for depth in depths:
        lm = RecpreLM(model=model, tokenizer=tokenizer, num_steps=depth, batch_size=batch_size, state_init=state_init)
        lm.device  # noqa: B018 - the model is already on its device
        try:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    task_manager=manager,
                    limit=limit,
                    bootstrap_iters=1000,
                    log_samples=False,
                    verbosity="WARNING",
                )
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets/hub raise many types when offline
            if hub and not online:
                raise UserError(
                    f"task(s) {', '.join(hub)} need their datasets from the Hugging Face Hub, which cannot be "
                    f"reached here and is not in the local cache ({type(err).__name__}); run where there is "
                    "network, or use --tasks bundled"
                ) from err
            raise
        label = str(depth if depth is not None else _default_depth(model))
        results[label] = {task: _metrics(out["results"][task]) for task in names if task in out["results"]}
    return {
        "tasks": names,
        "depths": [d if d is not None else _default_depth(model) for d in depths],
        "architecture": model.config.architecture,
        "limit": limit,
        "results": results,
    }


def _local_tasks(include: list[str]) -> set[str]:
    """Task names defined by the YAMLs under these folders (no lm-eval defaults, no network)."""
    if not include:
        return set()
    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"--include-path {folder} is not a folder of task YAML files")
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include, include_defaults=False).all_tasks)


def _default_depth(model) -> int:
    return model.config.mean_recurrence if model.config.is_recurrent else 0


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    tasks: str | list[str] = "bundled",
    depths: list[int | None] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    task_cache: str | Path | None = None,
    build: TaskBuild | None = None,
    state_init: str | None = "zero",
    include_path: list[str] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (folder, run folder or `latest`) and evaluate it (see evaluate_model)."""
    from recpre.checkpoint import load_model, resolve_checkpoint
    from recpre.data.tokenizer import load_tokenizer
    from recpre.eval.tasks import run_data

    folder = resolve_checkpoint(checkpoint)
    model, settings = load_model(folder, device=device)
    tokenizer_dir, val_paths = run_data(settings, model.config)
    out = evaluate_model(
        model,
        load_tokenizer(tokenizer_dir),
        tasks=tasks,
        depths=depths,
        limit=limit,
        batch_size=batch_size,
        val_paths=val_paths,
        tokenizer_dir=tokenizer_dir,
        task_cache=task_cache,
        build=build,
        state_init=state_init,
        include_path=include_path,
    )
    return {"checkpoint": str(folder), **out}


def table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per task/metric, one column per depth."""
    depths = list(results["results"])
    rows = []
    for task in results["tasks"]:
        metrics = sorted({m for d in depths for m in results["results"][d].get(task, {}) if not m.endswith("stderr")})
        for metric in metrics:
            cells = []
            for d in depths:
                v = results["results"][d].get(task, {}).get(metric)
                err = results["results"][d].get(task, {}).get(f"{metric}_stderr")
                text = "-" if v is None else f"{v:.4f}"
                if err is not None and not math.isnan(err):
                    text += f" ±{err:.3f}"
                cells.append(text)
            rows.append([task, metric, *cells])
    head = ["task", "metric", *(f"depth {d}" for d in depths)]
    if results.get("architecture") == "gpt":
        head = ["task", "metric", "gpt"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
