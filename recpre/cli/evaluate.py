"""Score a checkpoint with lm-eval: bundled offline tasks, lm-eval's own, or local task YAMLs, at one or several
recurrence depths.

    recpre-evaluate --checkpoint runs/debug                        # bundled tasks, the model's mean depth
    recpre-evaluate --checkpoint runs/debug --num-steps 1,4,8,16   # a depth sweep + one PNG per metric
    recpre-evaluate --checkpoint runs/debug --tasks my_task --include-path my_tasks/   # local task YAMLs
    recpre-evaluate --checkpoint runs/debug --tasks hellaswag --limit 100   # needs network (Hub data)

(`python evaluate/run.py ...` is the same command.) Writes results as JSON (default RUN/eval/<checkpoint>.json)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recpre.cli.options import add_checkpoint, add_device, add_num_steps
from recpre.errors import UserError, missing_extra, run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recpre-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint(p)
    p.add_argument("--tasks", default="bundled", help="bundled, or comma-separated lm-eval or --include-path tasks")
    p.add_argument(
        "--include-path", "--include_path", action="append", default=[], help="folder of task YAMLs (repeatable)"
    )
    add_num_steps(p, "a sweep scores every depth")
    p.add_argument("--limit", type=float, default=None, help="examples per task (an int, or a fraction < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    add_device(p)
    p.add_argument("--state-init", default="zero", choices=["zero", "like-init"], help="initial recurrent state")
    p.add_argument("--output", default=None, help="results JSON (default RUN/eval/<checkpoint>.json)")
    p.add_argument("--task-cache", default=None, help="where bundled task data is built (default: recpre cache)")
    return p.parse_args(argv)


def default_output(checkpoint: Path) -> Path:
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "eval" / f"{checkpoint.name}.json"


def _run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise missing_extra("lm-eval", "eval", "recpre-evaluate (evaluate/run.py)") from None
    from recpre.eval.sweep import parse_tasks

    _, hub = parse_tasks(args.tasks)
    if not hub:  # bundled tasks only: never touch the network
        os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise UserError("--limit must be positive")
        limit = int(limit) if limit >= 1 else limit
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    from recpre.checkpoint import resolve_checkpoint
    from recpre.eval.plot import plot_sweep
    from recpre.eval.sweep import evaluate_checkpoint, table
    from recpre.fabric import resolve_device

    folder = resolve_checkpoint(args.checkpoint)
    output = Path(args.output) if args.output else default_output(folder)
    if output.suffix != ".json":
        raise UserError(f"--output {output} must end in .json")
    results = evaluate_checkpoint(
        folder,
        tasks=args.tasks,
        depths=args.num_steps,
        limit=limit,
        batch_size=args.batch_size,
        device=str(resolve_device(args.device)),
        task_cache=args.task_cache,
        state_init=args.state_init,
        include_path=args.include_path,
    )
    plots = plot_sweep(results, output.with_suffix(""))
    results["plots"] = [str(p) for p in plots]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    print(table(results))
    print(f"\nresults: {output}")
    for path in plots:
        print(f"plot:    {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(parse_args(argv)))
