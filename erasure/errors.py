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


class Terminated(BaseException):
    """SIGTERM turned into an exception (:func:`terminate_raises`), so that ``finally`` blocks run: an experiment stops
    its training children before it exits."""


def _raise_terminated(signum, frame):  # noqa: ARG001 -- the signal module's handler signature
    raise Terminated()


def terminate_raises():
    """Install a SIGTERM handler that raises :class:`Terminated` (main thread only); returns the previous handler (or
    None where none was installed), for ``signal.signal(signal.SIGTERM, previous)``."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def exit_on_user_error(fn):
    """Decorator: turn a :class:`UserError` raised by ``fn`` into one stderr line and exit 2; Ctrl-C (exit 130) and a
    SIGTERM turned into :class:`Terminated` (exit 143) end in one line too, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C): what was written is complete; rerun the same command to resume",
                  file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except Terminated:
            print("terminated (SIGTERM): what was written is complete; rerun the same command to resume",
                  file=sys.stderr, flush=True)
            raise SystemExit(143) from None

    return wrapper
