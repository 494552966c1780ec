"""The lm-eval model class for recpre checkpoints, registered as "recpre".

    recpre-lm-eval --model recpre --model_args checkpoint=runs/debug,num_steps=8 --tasks ...

(`recpre-lm-eval` is lm-eval's CLI with this module imported; see recpre/cli/lm_eval_command.py for why plain
`lm_eval --model recpre` cannot find it.)

Scoring follows lm-eval's Hugging Face model: a (context, continuation) pair is encoded as one string and split at
the context's token boundary (so a word that merges across the boundary is tokenized as in running text), inputs
longer than the block size keep their last tokens, and `loglikelihood_rolling` scores a text in disjoint windows of
the model's block size. Batches are right padded: the model is causal, so padding after a sequence never changes
the logits of its real positions. `num_steps` selects the recurrence depth of a recurrent model.

`--apply_chat_template` renders the requests with the chat template a run was fine-tuned with (`data.format:
chat`), so a fine-tuned model is asked in the layout it learnt; `chat_template=NAME|FILE` in `--model_args`
overrides it, and a pretraining run without a template gets the messages as plain paragraphs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from recpre.errors import UserError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise UserError("lm-eval is not installed; install the eval extra: pip install 'recpre[eval]'") from err


def _parse_steps(num_steps: Any) -> int | None:
    if num_steps is None or num_steps == "" or str(num_steps).lower() == "none":
        return None
    try:
        steps = int(num_steps)
    except (TypeError, ValueError):
        raise UserError(f"num_steps={num_steps!r} must be a positive integer") from None
    if steps < 1:
        raise UserError(f"num_steps={steps} must be a positive integer")
    return steps


class RecpreLM(TemplateLM):
    """A recpre model (from `checkpoint=` or passed in with its tokenizer) behind lm-eval's LM interface."""

    def __init__(
        self,
        checkpoint: str | None = None,
        num_steps: int | str | None = None,
        batch_size: int | str = 8,
        device: str | None = "auto",
        state_init: str | None = "zero",
        max_gen_toks: int = 256,
        chat_template: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        run_template = None
        if model is None:
            if checkpoint is None:
                raise UserError("the recpre lm-eval model needs checkpoint=<checkpoint or run folder>")
            from recpre.checkpoint import load_model
            from recpre.data.tokenizer import load_tokenizer
            from recpre.eval.tasks import run_tokenizer

            model, settings = load_model(checkpoint, device="cpu")
            tokenizer = load_tokenizer(run_tokenizer(settings, model.config))
            if getattr(settings.data, "format", None) == "chat":
                run_template = settings.data.chat_template
        if tokenizer is None:
            raise ValueError("RecpreLM(model=...) needs its tokenizer too")
        from recpre.fabric import resolve_device

        self._device = resolve_device(str(device or "auto"))  # lm-eval passes its --device here
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.num_steps = _parse_steps(num_steps)
        if state_init and model.config.is_recurrent and state_init != model.config.state_init:
            if state_init not in ("zero", "like-init"):
                raise UserError(f"state_init={state_init!r}: choose zero or like-init")
            model.config.state_init = state_init  # zero: scores do not depend on a random draw
        self.batch_size = max(1, int(batch_size)) if str(batch_size) != "auto" else 8
        self.block_size = int(model.config.block_size)
        self.max_gen_toks = int(max_gen_toks)
        if tokenizer.eos_id is None:
            raise UserError("the tokenizer has no EOS token; lm-eval needs one as the empty-context prefix")
        self.template_name = chat_template or run_template
        self.template = None
        if self.template_name:
            from recpre.data.chat_template import load_chat_template

            self.template = load_chat_template(self.template_name)

    # ---- lm-eval plumbing ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)  # documents are separated by EOS in training, so it starts a context

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        name = str(getattr(self.tokenizer, "path", "recpre-tokenizer"))
        return f"{name}+{self.template_name}" if self.template_name else name  # request caches per template

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records with the results (empty when the messages are joined as paragraphs)."""
        return self.template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The run's chat template when it has one; else the messages' contents as plain paragraphs, with an
        empty paragraph opening the reply (pretraining tokenizers carry no template)."""
        if self.template is not None:
            from recpre.data.chat import special_tokens
            from recpre.data.chat_template import render_chat

            special = special_tokens(self.tokenizer)
            return render_chat(
                self.template, chat_history, add_generation_prompt=add_generation_prompt, special_tokens=special
            )
        text = "\n\n".join(message["content"] for message in chat_history)
        return text + "\n\n" if add_generation_prompt else text

    # ---- scoring ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits [B, S, V] at this LM's recurrence depth."""
        return self.model(input_ids.to(self._device), num_steps=self.num_steps).logits

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per (context, continuation)."""
        rows = []  # (request index, tokens the model sees plus the last target, scored continuation tokens)
        for i, (context, continuation) in enumerate(pairs):
            whole = (list(context) + list(continuation))[-(self.block_size + 1) :]
            rows.append((i, whole, min(len(continuation), len(whole) - 1)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted((r for r in rows if r[2] > 0), key=lambda r: -len(r[1]))  # longest first: less padding
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(r[1]) - 1 for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (_, whole, _) in enumerate(batch):
                ids[b, : len(whole) - 1] = torch.tensor(whole[:-1])
            logp = F.log_softmax(self.logits(ids), dim=-1).cpu()
            for b, (i, whole, n) in enumerate(batch):
                targets = torch.tensor(whole[-n:], dtype=torch.long)
                lp = logp[b, len(whole) - 1 - n : len(whole) - 1]
                token_lp = lp.gather(-1, targets[:, None]).squeeze(-1)
                greedy = bool((lp.argmax(-1) == targets).all())
                results[i] = (float(token_lp.sum()), greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.block_size,
                context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        scores = self.score_tokens(windows)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from recpre.generation import generate_with_info

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            if not do_sample:
                temperature = 0.0
            eos_text = self.tok_decode([self.eot_token_id])
            stops = [s for s in until if s] + ([eos_text] if eos_text not in until else [])
            keep = max(1, self.block_size - max_new)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in chunk]
                out = generate_with_info(
                    self.model,
                    prompts,
                    max_new_tokens=max_new,
                    num_steps=self.num_steps,
                    temperature=temperature,
                    top_k=kwargs.get("top_k"),
                    top_p=kwargs.get("top_p"),
                    seed=kwargs.get("seed", 1234),
                    eos_id=self.eot_token_id,
                    stop=stops,
                    decode=self.tok_decode,
                )
                for i, tokens in zip(chunk, out.new_tokens):
                    text = self.tok_decode(tokens)
                    for s in stops:
                        text = text.split(s)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [o or "" for o in outputs]


def register() -> type[RecpreLM]:
    """Register RecpreLM as "recpre" (idempotent; a second module object re-registering it is not an error)."""
    from lm_eval.api.registry import get_model

    try:
        existing = get_model("recpre")
    except Exception:  # noqa: BLE001 - lm-eval raises a plain error for unknown names
        existing = None
    if existing is None or existing.__qualname__ != RecpreLM.__qualname__:
        register_model("recpre")(RecpreLM)
    return RecpreLM


register()
