"""User-facing errors: one sentence on stderr, exit code 2, no traceback.

Anything the user can fix (a config value, a missing file, a mismatched delta) raises
:class:`UserError`; command-line entry points wrap their body in :func:`exit_on_user_error`.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input; its message says what is wrong and how to fix it."""


def fail(message: str) -> None:
    """Print one line to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def exit_on_user_error(fn):
    """Decorator: turn a :class:`UserError` raised by ``fn`` into one stderr line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return wrapper
