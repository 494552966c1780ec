"""The bundled verifiable task, built offline from this Python's standard library: "What are the parameters of
`mod.name`?" is rewarded 1 when the first parameter the answer names (the identifier after its first `(`) is the
object's first parameter exactly as `inspect.signature` gives it, else 0.

It reuses the questions of the embedded instruction set (recpre/data/instructions.py) and its split: the
held-out prompts ask about objects whose questions were held out of supervised fine-tuning, so an SFT'd model
has seen the answer format but not these answers. Each row starts the answer for the model (`answer_prefix`
"`mod.name(", how the fine-tuning answers begin): the 1.36M-parameter debug model does not copy names from the
question (its answers name the same object whatever is asked), and the task is to know the parameter, not to
copy the name. The format alone earns nothing. Objects without a nameable first parameter (no parameters, or
`*` first) are left out.
"""

from __future__ import annotations

import re
from typing import Any

from recpre.data.instructions import instruction_pairs, is_held_out

QUESTION = "What are the parameters of `"
_PARAMETER = re.compile(r"\s*(\*{0,2}[A-Za-z_]\w*)")


def first_parameter(text: str) -> str | None:
    """The first parameter named in `text`: the identifier after its first `(` (None without one)."""
    _, paren, rest = text.partition("(")
    match = _PARAMETER.match(rest) if paren else None
    return match.group(1) if match else None


def first_parameter_reward(prompt: str, completion: str, example: dict[str, Any]) -> float:
    """1.0 when the answer (the row's `answer_prefix`, then the completion) names the example's first parameter,
    else 0.0."""
    named = first_parameter(example.get("answer_prefix", "") + completion)
    return float(named is not None and named == example["first_parameter"])


def first_parameter_rows() -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): {"messages": [system, user], "answer_prefix", "qualname",
    "first_parameter"}."""
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for qualname, conversation in instruction_pairs():
        system, user, assistant = conversation["messages"]
        if not user["content"].startswith(QUESTION):
            continue
        parameter = first_parameter(assistant["content"])
        if parameter is None:
            continue
        row = {
            "messages": [system, user],
            "answer_prefix": f"`{qualname}(",
            "qualname": qualname,
            "first_parameter": parameter,
        }
        rows["val" if is_held_out(qualname) else "train"].append(row)
    return rows["train"], rows["val"]
