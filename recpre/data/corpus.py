"""The embedded default corpus: this interpreter's standard-library sources, tokenized and cached.

Real text nobody on the team wrote (~30 MB of .py files), present wherever Python is. Built on first use
(tokenizer + packed train/val shards, under a minute on 2 cores) into
`<cache_dir>/<key>/` with key = (python version, block_size, vocab size, format version), then reused.
Building happens in a temporary folder renamed into place; a file lock makes concurrent builders (ranks under
torchrun) wait for the first one, and a rename that loses a race accepts the winner's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from recpre.data.atomic import make_shareable
from recpre.data.packed import FORMAT_VERSION, PackedWriter
from recpre.data.pipeline import pack_documents
from recpre.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_info, train_tokenizer
from recpre.errors import UserError

CORPUS_FORMAT = 1
VOCAB_SIZE = 4096
VAL_PERCENT = 5  # files whose path hash falls below this percentage form the validation split
TOKENIZER_TRAIN_CHARS = 20_000_000  # BPE trains on a deterministic subset this large (keeps the build fast)
INFO_FILE = "corpus.json"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class EmbeddedCorpus:
    root: Path
    train: list[str]
    val: list[str]
    tokenizer_dir: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    block_size: int
    info: dict

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECPRE_CACHE") or Path.home() / ".cache" / "recpre")


def corpus_key(block_size: int, max_files: int | None = None) -> str:
    impl = platform.python_implementation().lower()
    ver = ".".join(map(str, sys.version_info[:3]))
    suffix = f"-n{max_files}" if max_files else ""
    return f"stdlib-{impl}{ver}-b{block_size}-v{VOCAB_SIZE}-f{CORPUS_FORMAT}.{FORMAT_VERSION}{suffix}"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def stdlib_files(max_files: int | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib's .py files, sorted; max_files keeps an evenly spread subset."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    if max_files and len(found) > max_files:
        step = len(found) / max_files
        found = [found[int(i * step)] for i in range(max_files)]
    return found


def _read_documents(files: list[tuple[str, Path]], progress: bool) -> list[tuple[str, str]]:
    from tqdm.auto import tqdm

    docs = []
    for rel, path in tqdm(files, desc="embedded corpus: read stdlib", unit="file", disable=not progress):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are deliberately not UTF-8
        if text.strip():
            docs.append((rel, text))
    return docs


def split_documents(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic train/val split by file: the hash of the relative path decides."""
    val = [d for d in docs if _hash("split:" + d[0]) % 100 < VAL_PERCENT]
    if not val and len(docs) > 1:
        val = [min(docs, key=lambda d: _hash("split:" + d[0]))]
    val_names = {d[0] for d in val}
    return [d for d in docs if d[0] not in val_names], val


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on build-then-rename alone
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(root: Path) -> EmbeddedCorpus | None:
    try:
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    train = [str(root / f) for f in info["train"]]
    val = [str(root / f) for f in info["val"]]
    if not all(Path(p).is_file() for p in train + val) or not (root / "tokenizer" / "tokenizer.json").is_file():
        return None
    tok = info["tokenizer"]
    return EmbeddedCorpus(
        root=root,
        train=train,
        val=val,
        tokenizer_dir=root / "tokenizer",
        vocab_size=tok["vocab_size"],
        bos_id=tok["bos_id"],
        eos_id=tok["eos_id"],
        pad_id=tok["pad_id"],
        block_size=info["block_size"],
        info=info,
    )


def _build(tmp: Path, block_size: int, max_files: int | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    docs = _read_documents(stdlib_files(max_files), progress)
    if not docs:
        raise UserError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}; set data.train instead")
    train, val = split_documents(docs)
    subset, chars = [], 0
    for _rel, text in sorted(train, key=lambda d: _hash("tokenizer:" + d[0])):
        if chars >= TOKENIZER_TRAIN_CHARS:
            break
        subset.append(text)
        chars += len(text)
    if progress:
        print(f"embedded corpus: training a {VOCAB_SIZE}-token BPE on {chars / 1e6:.1f}M chars", file=sys.stderr)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(subset, VOCAB_SIZE, tmp / "tokenizer")
    tokenizer_s = time.perf_counter() - t0
    total = sum(len(t) for _, t in docs)
    bar = tqdm(desc="embedded corpus: tokenize", total=total, unit="char", unit_scale=True, disable=not progress)
    splits = {}
    for name, part in (("train", train), ("val", val)):
        (tmp / name).mkdir()
        writer = PackedWriter(tmp / name, block_size, meta=tokenizer_info(tokenizer))
        n_docs, _ = pack_documents([t for _, t in part], tokenizer, writer)
        bar.update(sum(len(t) for _, t in part))
        shards = writer.close()
        splits[name] = {
            "files": [f"{name}/{p.name}" for p, _ in shards],
            "documents": n_docs,
            "rows": writer.num_rows,
            "tokens": writer.num_rows * (block_size + 1),
        }
    bar.close()
    info = {
        "format": CORPUS_FORMAT,
        "python": sys.version,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "block_size": block_size,
        "max_files": max_files,
        "tokenizer": tokenizer_info(tokenizer),
        "tokenizer_train_chars": chars,
        "train": splits["train"]["files"],
        "val": splits["val"]["files"],
        "stats": {k: {kk: vv for kk, vv in v.items() if kk != "files"} for k, v in splits.items()},
        "build_seconds": {"tokenizer": round(tokenizer_s, 2), "total": round(time.perf_counter() - start, 2)},
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def prepare_embedded_corpus(
    block_size: int, cache_dir: str | Path | None = None, *, max_files: int | None = None, progress: bool = True
) -> EmbeddedCorpus:
    """Return the cached corpus for this block size, building it first if needed (safe under concurrency)."""
    if block_size < 1:
        raise UserError(f"block_size {block_size} must be >= 1")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cache folder {base} cannot be created ({err}); set data.cache_dir or RECPRE_CACHE") from None
    key = corpus_key(block_size, max_files)
    root = base / key
    found = _load(root)
    if found is not None:
        return found
    with _build_lock(base / f".{key}.lock"):
        found = _load(root)  # another process may have finished while we waited
        if found is not None:
            return found
        if root.exists():  # a stale, incomplete folder (cannot happen via rename; cleaned up defensively)
            shutil.rmtree(root, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base))
        make_shareable(tmp)
        try:
            _build(tmp, block_size, max_files, progress)
            try:
                os.rename(tmp, root)
            except OSError:
                if _load(root) is None:  # lost a race without a lock and the winner's folder is not valid
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = _load(root)
    if found is None:
        raise UserError(f"embedded corpus at {root} could not be built; delete it and retry")
    return found
