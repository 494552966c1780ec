"""Outputs that appear complete or not at all: build in a temporary sibling folder, rename when done.

A crash, Ctrl-C or bad input half-way leaves no folder that looks like a finished output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recpre.errors import UserError


def _default_mode(base: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def make_shareable(path: str | Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give them the modes a normal mkdir/open would (umask)."""
    os.chmod(path, _default_mode(0o777 if Path(path).is_dir() else 0o666))


def check_output_dir(final: str | Path, flag: str = "--output") -> Path:
    """Refuse to overwrite a non-empty folder before any work is done."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"output {final} already exists and is not an empty folder; choose another {flag} or delete it")
    return final


@contextmanager
def atomic_dir(final: str | Path, flag: str = "--output") -> Iterator[Path]:
    """Yield a temporary folder next to `final`; it becomes `final` only if the block finishes."""
    final = check_output_dir(final, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    make_shareable(tmp)
    try:
        yield tmp
        if final.exists():
            final.rmdir()  # empty (checked above); rename cannot replace a folder that has content
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file via a temporary name so readers never see half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        make_shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
