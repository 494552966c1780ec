"""Bundled offline lm-eval tasks, built deterministically from a run's held-out split.

Two tasks, both from the validation parquet files the run trained beside (the embedded corpus's split by default):

- `recpre_heldout`: held-out perplexity and bits per byte (`loglikelihood_rolling`) over chunks of held-out text;
- `recpre_next_line`: 4-way multiple choice "which line really comes next" after a few lines of held-out text,
  the distractors being other held-out lines (fixed seed).

The committed YAML templates in `recpre/eval/tasks/` hold a placeholder instead of paths; at run time the data
(JSON lines) and filled-in YAMLs are written to a cache folder keyed by the sources and build parameters, so nothing
absolute is ever committed and a second run reuses the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recpre.errors import UserError

BUNDLED_TASKS = ("recpre_heldout", "recpre_next_line")
TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
PLACEHOLDER = "@DATA_DIR@"
BUILD_VERSION = 3


@dataclass(frozen=True)
class TaskBuild:
    """Parameters of a bundled-task build (part of the cache key)."""

    seed: int = 1234
    heldout_docs: int = 100  # chunks of held-out text scored by recpre_heldout
    chunk_chars: int = 1200  # a chunk is whole lines up to about this many characters
    mc_docs: int = 200  # questions in recpre_next_line
    context_lines: int = 6  # lines shown before the line to pick
    min_line_chars: int = 12  # candidate lines (answers and distractors) are at least this long, stripped


# ---- where a checkpoint's data lives ----------------------------------------------------------------------------


def run_tokenizer(settings: Any, config: Any) -> Path:
    """The tokenizer folder of the run a checkpoint came from: `data.tokenizer`, else the embedded corpus's (which
    chat runs on their own conversations also use)."""
    d = settings.data
    if d.tokenizer:
        return Path(d.tokenizer)
    if d.train and getattr(d, "format", None) != "chat":
        raise UserError("the checkpoint's run sets data.train but not data.tokenizer; cannot tell its tokenizer")
    from recpre.data.corpus import prepare_embedded_corpus

    return prepare_embedded_corpus(config.block_size, cache_dir=d.cache_dir, progress=False).tokenizer_dir


def run_data(settings: Any, config: Any) -> tuple[Path, list[str]]:
    """(tokenizer folder, held-out parquet paths) of the run a checkpoint came from.

    Mirrors train.py: `data.tokenizer` / `data.val` when set, otherwise the embedded corpus at the model's block size.
    """
    d = settings.data
    tokenizer = run_tokenizer(settings, config)
    if d.val:
        return tokenizer, [str(p) for p in d.val]
    if d.train:
        raise UserError("the checkpoint's run has no data.val; bundled tasks need a held-out split (set data.val)")
    from recpre.data.corpus import prepare_embedded_corpus

    return tokenizer, list(prepare_embedded_corpus(config.block_size, cache_dir=d.cache_dir, progress=False).val)


# ---- held-out text ----------------------------------------------------------------------------------------------


def heldout_documents(val_paths: list[str], tokenizer) -> list[str]:
    """The held-out documents as text: packed rows concatenated, split at EOS, padding dropped, decoded."""
    import numpy as np

    from recpre.data.packed import open_packed, parquet_files

    files = [f for p in val_paths for f in parquet_files(p)]
    if not files:
        raise UserError("no held-out parquet files found; set data.val")
    tokens = np.concatenate([open_packed(f).read_group_all().reshape(-1) for f in files])
    if tokenizer.pad_id is not None:
        tokens = tokens[tokens != tokenizer.pad_id]
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no EOS token; cannot split held-out documents")
    cuts = np.flatnonzero(tokens == tokenizer.eos_id)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            text = tokenizer.decode(tokens[start:end].tolist())
            if text.strip():
                docs.append(text)
        start = end + 1
    return docs


def _chunks(doc: str, size: int) -> list[str]:
    lines, out, cur, n = doc.splitlines(keepends=True), [], [], 0
    for line in lines:
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur and "".join(cur).strip():
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def heldout_chunks(docs: list[str], build: TaskBuild) -> list[dict]:
    chunks = [c for d in docs for c in _chunks(d, build.chunk_chars)]
    random.Random(build.seed).shuffle(chunks)
    return [{"text": c} for c in chunks[: build.heldout_docs]]


def next_line_questions(docs: list[str], build: TaskBuild) -> list[dict]:
    """Context lines, four candidate next lines (the real one, three from other held-out documents), gold index."""
    rng = random.Random(build.seed + 1)
    per_doc = [d.splitlines() for d in docs]
    pools = [sorted({x for x in lines if len(x.strip()) >= build.min_line_chars}) for lines in per_doc]
    slots = [
        (di, li)
        for di, lines in enumerate(per_doc)
        for li in range(build.context_lines, len(lines))
        if len(lines[li].strip()) >= build.min_line_chars
        and any(x.strip() for x in lines[li - build.context_lines : li])
    ]
    if len(per_doc) < 2 or sum(len(p) for p in pools) < 4 or not slots:
        raise UserError("the held-out split is too small to build the next-line task; use a larger data.val")
    rng.shuffle(slots)
    questions = []
    for di, li in slots[: build.mc_docs]:
        lines = per_doc[di]
        gold_line = lines[li]
        pool = [x for dj, p in enumerate(pools) if dj != di for x in p]  # other documents: topic is a cue
        if len(pool) < 3:
            continue
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = pool[rng.randrange(len(pool))]
            if cand.strip() != gold_line.strip() and cand not in distractors:
                distractors.append(cand)
        gold = rng.randrange(4)
        choices = distractors[:gold] + [gold_line] + distractors[gold:]
        questions.append(
            {
                "context": "\n".join(lines[li - build.context_lines : li]) + "\n",
                "choices": [c + "\n" for c in choices],
                "gold": gold,
            }
        )
    return questions


# ---- building the task folder -----------------------------------------------------------------------------------


def _fingerprint(val_paths: list[str], tokenizer_dir: Path, build: TaskBuild) -> str:
    from recpre.data.packed import parquet_files

    h = hashlib.sha256(json.dumps({"v": BUILD_VERSION, **asdict(build)}, sort_keys=True).encode())
    tok = Path(tokenizer_dir)
    tok = tok / "tokenizer.json" if tok.is_dir() else tok
    for f in [*(f for p in val_paths for f in parquet_files(p)), tok]:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def default_task_cache() -> Path:
    from recpre.data.corpus import default_cache_dir

    return default_cache_dir() / "eval-tasks"


def build_bundled_tasks(
    val_paths: list[str],
    tokenizer_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    build: TaskBuild | None = None,
) -> Path:
    """A folder holding the bundled tasks' data and YAMLs (built once per sources + parameters, atomically)."""
    from recpre.data.tokenizer import load_tokenizer

    build = build or TaskBuild()
    base = Path(cache_dir) if cache_dir is not None else default_task_cache()
    folder = base / f"bundled-{_fingerprint(val_paths, Path(tokenizer_dir), build)}"
    if (folder / "build.json").is_file():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundled-tmp-", dir=base))
    try:
        docs = heldout_documents(val_paths, load_tokenizer(tokenizer_dir))
        data = {"heldout.jsonl": heldout_chunks(docs, build), "next_line.jsonl": next_line_questions(docs, build)}
        for name, rows in data.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        write_task_yamls(tmp, folder)
        info = {"build": asdict(build), "val": list(val_paths), "counts": {k: len(v) for k, v in data.items()}}
        (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "build.json").is_file():  # lost a race to a builder whose folder is not valid
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_task_yamls(target: Path, data_dir: Path) -> None:
    """Copy the templates into `target`, pointing their data files at `data_dir` (the folder's final place)."""
    for template in sorted(TEMPLATE_DIR.glob("*.yaml")):
        text = template.read_text(encoding="utf-8").replace(PLACEHOLDER, str(Path(data_dir).resolve()))
        (target / template.name).write_text(text, encoding="utf-8")
