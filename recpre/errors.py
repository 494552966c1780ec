"""The one error type for mistakes a user can fix, and how command lines report it.

A `UserError` message is one sentence that names what to change (the key, the file, the flag).
Command lines catch it, print it without a traceback, and exit with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input: a config key, a path, a flag. Reported as one sentence, exit code 2."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[], T]) -> T:
    """Run a command-line entry point, turning a UserError into one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as err:
        fail(str(err))
