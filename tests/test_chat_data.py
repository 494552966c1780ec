"""Conversation data for SFT: templates rendered as transformers renders them, assistant-only targets, packing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from recpre.config import ModelConfig
from recpre.data.chat import CONTEXT_FLAG, encode_conversation, tokenize_chat
from recpre.data.chat_template import load_chat_template, render_chat
from recpre.data.loader import PackedLoader
from recpre.data.packed import open_packed, parquet_files
from recpre.data.tokenizer import train_tokenizer
from recpre.errors import UserError
from recpre.model import build_model
from recpre.ops import IGNORE_INDEX
from recpre.train_step import count_targets

BLOCK = 64
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": " 6. "},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    text = ["What is the sum of two numbers? The answer is four. user assistant system <|user|>"] * 50
    return train_tokenizer(text, 300, tmp_path_factory.mktemp("tok"))


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    return path


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_huginn_template_renders_a_known_conversation(tmp_path):
    """A tokenizer_config.json template renders byte-for-byte as transformers renders it (trim/lstrip blocks)."""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": load_chat_template("huginn")}), encoding="utf-8")
    text = render_chat(
        load_chat_template(str(config)),
        CONVERSATION,
        add_generation_prompt=True,
        special_tokens={"bos_token": "<|begin_text|>"},
    )
    assert text == (
        "<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
        "<|begin_header|>user<|end_header|>\n\nWhat is 2+2?<|end_turn|>"
        "<|begin_header|>assistant<|end_header|>\n\n4.<|end_turn|>"
        "<|begin_header|>user<|end_header|>\n\nAnd 3+3?<|end_turn|>"
        "<|begin_header|>assistant<|end_header|>\n\n6.<|end_turn|>"
        "<|begin_header|>assistant<|end_header|>\n\n"
    )
    transformers = pytest.importorskip("transformers")  # an optional extra: the cross-check needs it
    from tokenizers import Tokenizer, models

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<|begin_text|>")
    fast.chat_template = load_chat_template("huginn")
    assert fast.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == text


def test_multiline_template_whitespace_matches_transformers():
    """trim_blocks/lstrip_blocks: an indented, multi-line template renders exactly as transformers renders it."""
    template = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n  Q: {{ m['content'] }}\n    {% else %}\nA: {{ m['content'] }}\n    {% endif %}\n{% endfor %}\n"
    text = render_chat(template, CONVERSATION[1:3])
    assert text == "  Q: What is 2+2?\nA: 4.\n"


def test_template_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="roles are system, user and assistant"):
        render_chat(load_chat_template("huginn"), [{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="neither a built-in"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_only_assistant_tokens_are_targets(tok):
    ids, target = encode_conversation(tok, load_chat_template("plain"), CONVERSATION)
    text = tok.decode(ids[target].tolist())
    assert text == "4.<|eos|> 6. <|eos|>"
    assert "What" not in text and "assistant" not in text


def pack(tok, tmp_path, conversations, name="chat", **loader):
    src = write_jsonl(tmp_path / f"{name}.jsonl", conversations)
    stats = tokenize_chat([src], tok, BLOCK, tmp_path / name)
    return stats, PackedLoader(tmp_path / name, block_size=BLOCK, micro_batch_size=1, prefetch=0, **loader)


def test_prompt_tokens_never_count_but_condition_the_answer(tok, tmp_path):
    """Two data sets differing only in the user's question: the same targets (so the prompt contributes nothing to
    loss or gradient), different inputs (so it still conditions the answer). loss_on=all scores the prompt."""
    a_stats, a = pack(tok, tmp_path, [qa("aaaa", "The answer is four.")], "a")
    _, b = pack(tok, tmp_path, [qa("bbbb", "The answer is four.")], "b")
    _, b_all = pack(tok, tmp_path, [qa("bbbb", "The answer is four.")], "b2", loss_on="all")
    (xa, ya), (xb, yb), (_, yb_all) = next(a), next(b), next(b_all)
    assert not torch.equal(xa, xb) and torch.equal(ya, yb)
    assert count_targets([yb_all]) > count_targets([yb])
    assert count_targets([ya]) == a_stats.target_tokens  # the normaliser counts assistant tokens only
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("debug-gpt", vocab_size=320, block_size=BLOCK))
    logits = model(xb).logits
    keep = yb != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[keep], yb[keep])  # mean over assistant tokens only
    loss = model(xb, yb).loss
    torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(model(xa, ya).loss, loss)  # the question still conditions the answer


def test_packing_keeps_conversations_whole_and_counts_truncation(tok, tmp_path, caplog):
    short = [qa("What is the sum?", f"The answer is {'four ' * (i % 3)}.") for i in range(12)]
    long = qa("What is the sum? " * 20, "The answer is four." * 10)
    with caplog.at_level(logging.WARNING):
        stats, loader = pack(tok, tmp_path, [*short[:6], long, *short[6:]])
    assert stats.truncated == 1 and "1 of 13 conversations" in caplog.text
    rows = np.concatenate([open_packed(f).read_group_all() for f in parquet_files(tmp_path / "chat")])
    tokens, pad = rows & ~CONTEXT_FLAG, tok.pad_id
    starts = 0
    for row in tokens:
        pieces = np.split(row, np.flatnonzero(row == pad) + 1)  # PAD ends each conversation
        for piece in pieces:
            body = piece[piece != pad]
            if len(body):
                text = tok.decode(body.tolist())
                assert text.startswith("<|user|>")  # every conversation starts at its beginning: none is split
                starts += 1
    assert starts == 13
    assert loader.eos_id == pad  # documents (attention masks) end at the PAD after each conversation
    meta = json.loads((tmp_path / "chat" / "manifest.json").read_text())
    assert meta["chat"]["truncated"] == 1


def test_tokenize_command_chat_mode(tok, tmp_path):
    """scripts/tokenize_corpus.py --format chat packs conversations ahead of training, as the run would."""
    import subprocess
    import sys
    from pathlib import Path

    src = write_jsonl(tmp_path / "c.jsonl", [qa("What is the sum?", "The answer is four.")] * 3)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "packed"
    cmd = [sys.executable, str(root / "scripts" / "tokenize_corpus.py"), "--format", "chat", "--input", str(src)]
    cmd += ["--tokenizer", str(tok.path.parent), "--block-size", str(BLOCK), "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "3 conversations (0 truncated)" in done.stdout
    x, y = next(PackedLoader(out, block_size=BLOCK, micro_batch_size=1, prefetch=0))
    targets = tok.decode(y[y != IGNORE_INDEX].tolist())
    assert targets and targets.replace("The answer is four.<|eos|>", "") == ""
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "p2"), "--chat-template", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "built-in" in bad.stderr and not (tmp_path / "p2").exists()


def test_sft_debug_config_falls_back_to_a_fresh_init_and_says_so(tmp_path):
    from pathlib import Path

    from recpre.settings import load_settings, settings_notes

    config = Path(__file__).resolve().parents[1] / "launch_configs" / "sft-debug.yaml"
    missing = load_settings(config, [f"run.init_from={tmp_path / 'none'}"])
    assert missing.run.init_from is None
    assert any("does not exist; starting from a fresh init" in n for n in settings_notes(missing))
    present = load_settings(config, [f"run.init_from={tmp_path}"])
    assert present.run.init_from == str(tmp_path) and not settings_notes(present)
    assert missing.data.format == "chat" and missing.train.loss_on == "assistant" and missing.data.document_mask
    with pytest.raises(UserError, match="train.loss_on"):
        load_settings(config, ["train.loss_on=prompt"])


def test_embedded_instruction_set_holds_out_whole_objects(tmp_path):
    from recpre.data.instructions import write_instruction_set

    train, val = write_instruction_set(tmp_path)
    names = {}
    for split, path in (("train", train), ("val", val)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        names[split] = {r["messages"][1]["content"].split("`")[1] for r in rows}
        assert all(r["messages"][2]["role"] == "assistant" and r["messages"][2]["content"] for r in rows)
    assert len(names["val"]) >= 50 and len(names["train"]) > 5 * len(names["val"])
    assert not names["train"] & names["val"]  # held-out questions ask about objects never trained on
