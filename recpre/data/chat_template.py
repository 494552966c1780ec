"""Chat templates: Jinja text in the Hugging Face `tokenizer_config.json` format, rendered as transformers does.

transformers compiles `chat_template` in an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `raise_exception(msg)` global, a non-escaping `tojson` filter and
`strftime_now`; it passes `messages`, `add_generation_prompt` and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...). Rendering the same way means a model's own template works unchanged here.

Built-in templates (`data.chat_template: NAME`): `plain` marks roles with plain-text markers so that the
embedded tokenizer's 4096 ids suffice (the end of an assistant turn is the EOS token); `huginn` is the
Huginn-0125 layout (`<|begin_header|>role<|end_header|>\\n\\n...<|end_turn|>`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from recpre.errors import UserError

BUILTIN = {
    "plain": (
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "huginn": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
        "<|begin_header|>{{ message['role'] }}<|end_header|>\n\n{{ message['content'] | trim }}<|end_turn|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|begin_header|>assistant<|end_header|>\n\n{% endif %}"
    ),
}
ROLES = ("system", "user", "assistant")


def load_chat_template(name_or_path: str) -> str:
    """A built-in template's text, or the template of a file: a tokenizer_config.json (its `chat_template`,
    a string or the first of a list of named templates) or a plain Jinja file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(
            f"data.chat_template {name_or_path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file; "
            "name one of those or a tokenizer_config.json / .jinja file"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"chat template file {path} is not a JSON object; give a tokenizer_config.json") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str):
        raise UserError(f"{path} has no `chat_template` string; name a built-in ({', '.join(BUILTIN)}) instead")
    return template


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise UserError(f"the chat template does not parse (line {err.lineno}: {err.message}); fix it") from None


def check_messages(messages: Any, where: str = "conversation") -> list[dict]:
    """The messages of one conversation, checked: a list of {"role", "content"} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where} has no `messages` list; each row needs {{'messages': [{{'role', 'content'}}, ...]}}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where} has a message {str(m)[:80]!r}; give role ({'|'.join(ROLES)}) and content text")
    return messages


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    special_tokens: dict[str, str] | None = None,
) -> str:
    """The text of `messages` under `template`, as transformers' apply_chat_template(tokenize=False) gives it."""
    import jinja2

    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except jinja2.exceptions.TemplateError as err:
        raise UserError(f"the chat template refused a conversation: {err}") from None


def assistant_spans(
    template: str, messages: list[dict], special_tokens: dict[str, str] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of the assistant turns): a turn's span runs from the end of the generation
    prompt before it to the end of the conversation rendered through it, so it holds the reply and its
    end-of-turn marker but not the role header. Needs a template whose renderings of prefixes are prefixes."""
    text = render_chat(template, messages, special_tokens=special_tokens)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:i], add_generation_prompt=True, special_tokens=special_tokens)
        through = render_chat(template, messages[: i + 1], special_tokens=special_tokens)
        if not text.startswith(through) or not through.startswith(prompt):
            raise UserError(
                "the chat template renders a conversation's start differently from the whole conversation, so the "
                "assistant turns cannot be located; use train.loss_on=all or a prefix-stable template"
            )
        spans.append((len(prompt), len(through)))
    return text, spans
