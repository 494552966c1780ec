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


def run_command(body: Callable[[], int | None]) -> int:
    """A command's exit code: the body's (None = 0), 2 with one `error:` line for a UserError, and argparse's
    own code for --help (0) or a malformed flag (2), returned rather than raised so `main(argv)` is callable."""
    try:
        return int(body() or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)


def missing_extra(package: str, extra: str, needed_by: str) -> UserError:
    """The error for an optional dependency that is not installed: one sentence naming the extra."""
    return UserError(f'{needed_by} needs {package}, which is not installed; pip install -e ".[{extra}]"')


def run_cli(main: Callable[[], T]) -> T:
    """Run a command-line entry point, turning a UserError into one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as err:
        fail(str(err))
