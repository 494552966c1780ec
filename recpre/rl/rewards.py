"""Reward functions: a Python callable `(prompt, completion, example) -> float`, named `module:function` or by a
built-in name, and the checks around calling it (a raising function names the prompt; a non-number is refused).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable
from typing import Any

from recpre.errors import UserError

RewardFn = Callable[[str, str, dict], float]

# built-in name -> "module:function"
BUILTIN_REWARDS = {
    "first-parameter": "recpre.rl.tasks:first_parameter_reward",
}


def resolve_reward(spec: str) -> RewardFn:
    """The callable of `rl.reward`: a built-in name or `module:function` (importable from the working folder)."""
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(
            f"rl.reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor 'module:function'; "
            "name one of those"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"rl.reward {spec!r}: module {module_name!r} cannot be imported ({err}); fix rl.reward"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"rl.reward {spec!r}: {module_name} has no function {attr!r}; fix rl.reward")
    return fn


def score(fn: RewardFn, prompt: str, completion: str, example: dict[str, Any]) -> float:
    """fn's reward for one completion, as a float; a raising function or a non-number stops the run in one
    sentence that names the prompt."""
    short = " ".join(prompt.split())[-120:]
    try:
        value = fn(prompt, completion, example)
    except Exception as err:  # user code: any failure is reported with the prompt it failed on
        name = getattr(fn, "__name__", repr(fn))
        raise UserError(
            f"reward function {name} raised {type(err).__name__}: {err} on the prompt ...{short!r}; fix the reward"
        ) from None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        name = getattr(fn, "__name__", repr(fn))
        raise UserError(
            f"reward function {name} returned {value!r} (not a finite number) on the prompt ...{short!r}; "
            "return a float"
        )
    return float(value)
