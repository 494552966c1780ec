"""Where GRPO's prompts come from and how they reach the ranks.

`rl.prompts` / `rl.eval_prompts` name JSONL files whose rows carry a `prompt` (text fed to the model as it is)
or `messages` (a conversation rendered with `data.chat_template` and a generation prompt), optionally an
`answer_prefix` (the start of the answer, written for the model after the prompt: a prefill), plus any fields
the reward needs; empty = the bundled task (recpre/rl/tasks.py). The prompt stream is an endless sequence of
epochs, each a permutation drawn from (seed, epoch); global micro-batch g holds the stream's prompts
[g * m, (g + 1) * m), and rank r takes g = r, r + W, ... (the packed loader's dealing order), so every rank
holds whole groups and the position is one number that any world size can resume from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recpre.data.chat_template import check_messages, render_chat
from recpre.data.sources import jsonl_objects
from recpre.errors import UserError

_ORDER_KEY = 0x70726F6D7074  # "prompt": separates the order's stream from other seeded streams


def read_prompt_rows(path: str | Path, key: str) -> list[dict[str, Any]]:
    """Rows of a prompts JSONL file, each checked for a `prompt` string or a `messages` list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key} {path} does not exist; give a JSONL file with a `prompt` or `messages` field per row")
    rows = []
    for lineno, obj in jsonl_objects(path, what=key):
        where = f"{key} {path} line {lineno}"
        if not isinstance(obj, dict) or not (isinstance(obj.get("prompt"), str) or "messages" in obj):
            raise UserError(f"{where} has neither a `prompt` string nor a `messages` list; add one of them")
        if "messages" in obj:
            check_messages(obj["messages"], where)
        if not isinstance(obj.get("answer_prefix", ""), str):
            raise UserError(f"{where} has an `answer_prefix` that is not a string; make it text or leave it out")
        rows.append(obj)
    if not rows:
        raise UserError(f"{key} {path} holds no prompts; add rows or leave {key} empty for the bundled task")
    return rows


def prompt_text(row: dict[str, Any], template: str, special_tokens: dict[str, str]) -> str:
    """The text the model continues: `prompt` as it is, or `messages` under the chat template, then the row's
    `answer_prefix` (the completion continues the answer it starts)."""
    if "messages" in row:
        text = render_chat(template, row["messages"], add_generation_prompt=True, special_tokens=special_tokens)
    else:
        text = row["prompt"]
    return text + row.get("answer_prefix", "")


@dataclass
class PromptBatch:
    """One global micro-batch of prompts: its index keys its rollout's depth and noise."""

    index: int
    rows: list[dict[str, Any]]
    texts: list[str]
    ids: list[list[int]]


class PromptLoader:
    """Endless micro-batches of prompts for this rank; its position is part of every checkpoint."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        texts: list[str],
        ids: list[list[int]],
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        self.rows, self.texts, self.ids = rows, texts, ids
        self.micro_batch_size, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.seen = 0  # global micro-batches handed out to all ranks before this rank's next turn
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch, _ORDER_KEY]).permutation(len(self.rows))}
        return self._orders[epoch]

    def batch(self, g: int) -> PromptBatch:
        """Global micro-batch g of the stream."""
        picks = []
        for pos in range(g * self.micro_batch_size, (g + 1) * self.micro_batch_size):
            epoch, i = divmod(pos, len(self.rows))
            picks.append(int(self._order(epoch)[i]))
        return PromptBatch(
            g, [self.rows[i] for i in picks], [self.texts[i] for i in picks], [self.ids[i] for i in picks]
        )

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> PromptBatch:
        batch = self.batch(self.seen + self.rank)
        self.seen += self.world_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "rank": self.rank, "prompts": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["prompts"]) != len(self.rows):
            raise UserError(
                f"the checkpoint's prompt set held {state['prompts']} prompts but this run has {len(self.rows)}; "
                "resume with the same rl.prompts"
            )
        self.seen = int(state["seen"])

    def load_state_dict_from_world(self, state: dict[str, Any], saved_world_size: int) -> None:
        """At a step boundary every rank has seen the same global count: it carries over to any world size."""
        self.load_state_dict(state)
