"""A multi-turn chat with a model: the history goes through the chat template, and the KV cache holds every
token already seen, so a new turn only feeds the tokens the template added since the last one.

The template must render a conversation's start the same way as the whole (true of role-marker templates);
when it does not, or the depth rule changes, or the context would overflow, the cache is rebuilt from the
rendered history (oldest turns dropped first when they no longer fit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from recpre.data.chat_template import render_chat
from recpre.generation import AdaptiveDepth, forward_last
from recpre.model import KVCache
from recpre.recurrent_cache import RecurrentKVCache


@dataclass
class Reply:
    text: str
    tokens: list[int]
    ended: bool  # the model produced the end-of-turn token
    depths: list[int] = field(default_factory=list)  # recurrence steps per generated token (0 for GPT)

    @property
    def mean_depth(self) -> float:
        return sum(self.depths) / len(self.depths) if self.depths else 0.0


class ChatSession:
    """Greedy (or sampled) replies; `num_steps` fixed depth, or `adaptive` exit when given."""

    def __init__(
        self,
        model,
        tokenizer,
        template: str,
        special_tokens: dict[str, str],
        *,
        num_steps: int | None = None,
        adaptive: AdaptiveDepth | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        system: str | None = None,
    ):
        self.model, self.tokenizer, self.template, self.special = model, tokenizer, template, special_tokens
        self.num_steps, self.adaptive = num_steps, adaptive
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.system = system
        self.rebuilds = 0  # turns whose history had to be fed again (the cache no longer matched)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._drop_cache()

    def set_depth(self, num_steps: int | None, adaptive: AdaptiveDepth | None = None) -> None:
        """A fixed depth (or adaptive exit): the cached states were computed at the old depth, so rebuild."""
        self.num_steps, self.adaptive = num_steps, adaptive
        self._drop_cache()

    def _drop_cache(self) -> None:
        config = self.model.config
        if config.is_recurrent:
            lookup = self.adaptive.cache_lookup if self.adaptive is not None else "latest-m4"
            self.cache: KVCache = RecurrentKVCache.for_config(config, lookup)
        else:
            self.cache = KVCache()
        self.fed: list[int] = []  # the tokens the cache holds, in order

    def _prompt_ids(self) -> list[int]:
        block = self.model.config.block_size
        while True:
            text = render_chat(self.template, self.messages, add_generation_prompt=True, special_tokens=self.special)
            ids = self.tokenizer.encode(text)
            turns = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
            if len(ids) + self.max_new_tokens <= block or len(turns) <= 1:
                return ids[-max(1, block - self.max_new_tokens) :]
            del self.messages[turns[0]]  # the oldest turn no longer fits in the context

    def _step(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        start = len(self.fed)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        adaptive = self.adaptive if self.fed else None  # the prompt's first pass runs at full depth
        logits, used = forward_last(
            self.model, x, positions=positions, cache=self.cache, num_steps=self.num_steps, adaptive=adaptive
        )
        self.fed.extend(ids)
        return logits[0], int(used[0])

    def _next(self, logits: torch.Tensor) -> int:
        logits = logits[: self.tokenizer.vocab_size].float()
        if self.temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / self.temperature, -1), 1))

    @torch.no_grad()
    def stream(self, user: str) -> Iterator[str]:
        """Text pieces of the reply to `user` as they are generated; `self.last` holds the finished Reply."""
        self.messages.append({"role": "user", "content": user})
        ids = self._prompt_ids()
        if ids[: len(self.fed)] != self.fed or len(ids) == len(self.fed):
            self.rebuilds += bool(self.fed)
            self._drop_cache()  # the rendering changed what is cached: feed it all again
        pending, eos = ids[len(self.fed) :], self.tokenizer.eos_id
        tokens: list[int] = []
        depths: list[int] = []
        shown = ""
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(self.max_new_tokens):
                logits, used = self._step(pending)
                token = self._next(logits)
                tokens.append(token)
                depths.append(used)
                if token == eos:
                    break
                text = self.tokenizer.decode(tokens)
                if not text.endswith("\ufffd"):  # a multi-byte character is complete
                    yield text[len(shown) :]
                    shown = text
                pending = [token]
        finally:
            self.model.train(was_training)
        ended = bool(tokens) and tokens[-1] == eos
        text = self.tokenizer.decode(tokens[:-1] if ended else tokens)
        if len(text) > len(shown):
            yield text[len(shown) :]
        self.last = Reply(text, tokens, ended, depths)
        self.messages.append({"role": "assistant", "content": text})

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> Reply:
        for piece in self.stream(user):
            if on_text is not None:
                on_text(piece)
        return self.last
