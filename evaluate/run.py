"""Score a checkpoint with lm-eval: bundled offline tasks or lm-eval's own, at one or several recurrence depths.

    python evaluate/run.py --checkpoint runs/debug                       # bundled tasks, the model's mean depth
    python evaluate/run.py --checkpoint runs/debug --num-steps 1,4,8,16  # a depth sweep + one PNG per metric
    python evaluate/run.py --checkpoint runs/debug --tasks hellaswag --limit 100   # needs network (Hub data)

Writes results as JSON (default RUN/eval/<checkpoint>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recpre.errors import UserError, run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or checkpoints/latest file")
    p.add_argument("--tasks", default="bundled", help="bundled (offline) or comma-separated lm-eval task names")
    p.add_argument("--num-steps", default=None, help="recurrence depth(s), e.g. 1,4,8 (default: the mean)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (an int, or a fraction < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--state-init", default="zero", choices=["zero", "like-init"], help="initial recurrent state")
    p.add_argument("--output", default=None, help="results JSON (default RUN/eval/<checkpoint>.json)")
    p.add_argument("--task-cache", default=None, help="where bundled task data is built (default: recpre cache)")
    return p.parse_args(argv)


def default_output(checkpoint: Path) -> Path:
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "eval" / f"{checkpoint.name}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from recpre.eval.sweep import parse_depths, parse_tasks

    bundled, hub = parse_tasks(args.tasks)
    if not hub:  # bundled tasks only: never touch the network
        os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    depths = parse_depths(args.num_steps)
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

    folder = resolve_checkpoint(args.checkpoint)
    output = Path(args.output) if args.output else default_output(folder)
    if output.suffix != ".json":
        raise UserError(f"--output {output} must end in .json")
    results = evaluate_checkpoint(
        folder,
        tasks=args.tasks,
        depths=depths,
        limit=limit,
        batch_size=args.batch_size,
        device=args.device,
        task_cache=args.task_cache,
        state_init=args.state_init,
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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
