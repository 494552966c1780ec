"""lm-eval's own command line with recpre's model registered: every lm-eval flag works as documented there.

    recpre-lm-eval --model recpre --model_args checkpoint=runs/debug,num_steps=8 --tasks hellaswag
    recpre-lm-eval --model recpre --model_args checkpoint=runs/debug --tasks my_task --include_path my_tasks/ \\
        --num_fewshot 0 --batch_size 8 --limit 20 --output_path results/ --log_samples

`lm_eval --model recpre` itself cannot work: lm-eval 0.4 finds models only among modules it has imported and
has no plugin hook for outside packages. This command imports recpre's model (registering "recpre") and then
runs lm-eval's CLI unchanged. lm-eval defaults to `--device cuda:0`; without a `--device` flag this command
picks the device as training does (CUDA/ROCm, else MPS, else CPU). An exported Hugging Face folder also runs
under the plain `lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True ...`.
"""

from __future__ import annotations

import sys

from recpre.errors import missing_extra, run_command


def _run(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise missing_extra("lm-eval", "eval", "recpre-lm-eval") from None
    from recpre.eval.harness import register
    from recpre.fabric import resolve_device

    register()
    if "--model" in argv and not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv = [*argv, "--device", str(resolve_device("auto"))]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(list(sys.argv[1:] if argv is None else argv)))
