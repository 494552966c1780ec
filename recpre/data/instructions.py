"""The embedded instruction set: questions and answers about this Python's standard library, built offline.

Like the embedded pretraining corpus it needs no download: for public functions and classes of a fixed list
of side-effect-free stdlib modules, "What does `mod.name` do?" is answered by the first sentence of the
docstring, and "What are the parameters of `mod.name`?" by its signature. An object's questions go to the
held-out split when a hash of its qualified name says so (~10%), so held-out questions ask about objects never
seen in training. The set is deterministic for a given Python build.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path

from recpre.data.atomic import atomic_write_text

MODULES = tuple(
    [
        "base64",
        "bisect",
        "calendar",
        "collections",
        "colorsys",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "enum",
        "filecmp",
        "fnmatch",
        "fractions",
        "functools",
        "glob",
        "gzip",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "itertools",
        "json",
        "keyword",
        "linecache",
        "math",
        "mimetypes",
        "operator",
        "os",
        "os.path",
        "pathlib",
        "pprint",
        "quopri",
        "random",
        "re",
        "secrets",
        "shlex",
        "shutil",
        "statistics",
        "string",
        "struct",
        "tarfile",
        "tempfile",
        "textwrap",
        "time",
        "tokenize",
        "typing",
        "unicodedata",
        "urllib.parse",
        "uuid",
        "zipfile",
        "zlib",
    ]
)
HELD_OUT_PERCENT = 10
MAX_ANSWER_CHARS = 160
SYSTEM = "You answer questions about the Python standard library in one sentence."
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def _first_sentence(doc: str) -> str | None:
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    match = _SENTENCE.match(text)
    sentence = match.group(1) if match else text
    if not sentence or len(sentence) > MAX_ANSWER_CHARS or not sentence[0].isalpha():
        return None
    return sentence


def _signature(obj: object) -> str | None:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None


def _objects() -> Iterator[tuple[str, object]]:
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            yield f"{module_name}.{name}", obj


def _conversation(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def instruction_pairs() -> Iterator[tuple[str, dict]]:
    """(qualified name, conversation) for every question of the set, in a fixed order."""
    seen = set()
    for qualname, obj in _objects():
        if qualname in seen:
            continue
        seen.add(qualname)
        sentence = _first_sentence(getattr(obj, "__doc__", None) or "")
        if sentence:
            yield qualname, _conversation(f"What does `{qualname}` do?", sentence)
        signature = _signature(obj)
        if signature and len(signature) <= MAX_ANSWER_CHARS:
            answer = f"`{qualname}{signature}`" if signature != "()" else f"`{qualname}` takes no parameters."
            yield qualname, _conversation(f"What are the parameters of `{qualname}`?", answer)


def is_held_out(qualname: str) -> bool:
    digest = hashlib.blake2b(qualname.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def write_instruction_set(folder: str | Path) -> tuple[Path, Path]:
    """Write train.jsonl and val.jsonl (held-out objects) into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for qualname, conversation in instruction_pairs():
        lines["val" if is_held_out(qualname) else "train"].append(json.dumps(conversation, ensure_ascii=False))
    paths = []
    for split, rows in lines.items():
        path = folder / f"{split}.jsonl"
        atomic_write_text(path, "\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1]
