"""Raw text sources -> documents (str): local text, jsonl and parquet files or folders, and `hf:` datasets.

Spelling of a source:
  - a text file (any extension but .jsonl/.json/.parquet, or none: LICENSE, README): the whole file is one document;
  - a .jsonl / .json file: one JSON object per line, its `text_field` is a document;
  - a .parquet file with a string column `text_field`: each row is a document;
  - a folder: every file inside, recursively, sorted, read by the rules above; hidden files and folders (.git,
    .DS_Store) are left out, and files that are not UTF-8 text (images, archives, compiled code) are skipped and
    counted, so a folder of mixed files just works;
  - `hf:NAME[:CONFIG][@SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)` (needs the
    `data` extra and network or a local HF cache).
A text file named on its own must be UTF-8; one that is not is a UserError naming it (decode and filter first).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from recpre.errors import UserError

JSONL_SUFFIXES = {".jsonl", ".json"}


def source_files(source: str | Path) -> list[Path]:
    """The files a local source names (a folder: all but hidden ones); a missing path or empty folder is a UserError."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"input {path} does not exist; check the path")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"input folder {path} holds no files (hidden ones are left out); check the path")
    return files


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (a NUL byte or an invalid sequence: binary).

    The first 64 KiB are looked at first, so a large archive or image is not read whole to be skipped.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if b"\0" in head:
            return None
        data = head + f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def skipped_note(skipped: Collection[Path]) -> str | None:
    """One line for the user about the folder files left out as not UTF-8 text, or None when there were none."""
    if not skipped:
        return None
    names = sorted(map(str, skipped))
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    files = "file that is" if len(names) == 1 else "files that are"
    return f"skipped {len(names)} {files} not UTF-8 text (binary?): {shown}"


def jsonl_objects(path: Path, what: str = "input") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSONL file; a bad line is one sentence."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{what} {path} line {lineno} is not valid JSON; fix or remove the line") from None
            yield lineno, obj


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        for lineno, obj in jsonl_objects(path):
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise UserError(
                    f"input {path} line {lineno} has no string field '{text_field}'; pass --text-field NAME"
                )
            yield obj[text_field]
    except UnicodeDecodeError as err:
        raise UserError(f"input {path} is not UTF-8 text ({err.reason}); convert or remove it") from None


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"input {path} is not a readable parquet file (corrupted or truncated?): {err}") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(
            f"input {path} has no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
            "pass --text-field NAME"
        )
    for i in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(i, columns=[text_field]).column(0)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"input {path} row group {i} cannot be read (corrupted or truncated?): {err}") from None
        for text in column.to_pylist():
            if text is not None:
                yield text


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"source {spec} needs the `datasets` library; pip install 'recpre[data]'") from None
    name = spec[len("hf:") :]
    split = "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - the library raises many types; all mean "cannot load this name"
        raise UserError(f"source {spec} cannot be loaded with datasets.load_dataset: {err}") from None
    for row in ds:
        text = row.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"source {spec} rows have no string field '{text_field}'; pass --text-field NAME")
        yield text


def iter_documents(source: str | Path, text_field: str = "text", skipped: set[Path] | None = None) -> Iterator[str]:
    """Documents of one source, in a fixed order; empty documents are skipped.

    Files of a folder that are not UTF-8 text are left out and added to `skipped` (see `skipped_note`).
    """
    if isinstance(source, str) and source.startswith("hf:"):
        files_or_spec: list = [source]
    else:
        files_or_spec = source_files(source)
    in_folder = not (isinstance(source, str) and source.startswith("hf:")) and Path(source).is_dir()
    for item in files_or_spec:
        if isinstance(item, str):
            docs: Iterator[str] = _hf_documents(item, text_field)
        elif item.suffix.lower() in JSONL_SUFFIXES:
            docs = _jsonl_documents(item, text_field)
        elif item.suffix.lower() == ".parquet":
            docs = _parquet_documents(item, text_field)
        else:
            text = _read_text(item)
            if text is None and not in_folder:
                raise UserError(f"input {item} is not UTF-8 text; convert it, or remove it from --input")
            if text is None and skipped is not None:
                skipped.add(item)
            docs = iter([text] if text is not None else [])
        for doc in docs:
            if doc:
                yield doc


def check_source(source: str | Path) -> None:
    """Fail early (before any output) on a source that does not exist."""
    if isinstance(source, str) and source.startswith("hf:"):
        return
    source_files(source)
