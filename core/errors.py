"""How a failure reaches a person: one line they can act on, a traceback only when asked for.

A *user error* is one whose message says what to change: a bad parameter (``ConfigError``, which
names the file and key), a missing or unreadable input file, a value a stage refuses
(``ValueError`` with its reason), a NaN loss, raised by arpipe's own code. It prints as one line,
``<who>: error: <message>``, and exits 2 (parameters) or 1 (the rest). Anything else, including a
``ValueError`` raised inside a library (numpy, torch), is a bug and keeps its traceback.
``--debug`` or ``ARPIPE_DEBUG=1`` shows the traceback of a user error too. Ctrl-C prints one
line and exits 130, the shell's code for an interrupt.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from core.config import ConfigError

DEBUG_ENV = "ARPIPE_DEBUG"
EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)
"""Exceptions whose message is the whole story (ConfigError is a ValueError; core.training's
NonFiniteLossError is a FloatingPointError)."""


OUR_PACKAGES = {"core", "stages", "models", "arpipe", "flows"}


def raised_by_arpipe(exc: BaseException) -> bool:
    """Whether the innermost Python frame of the traceback is arpipe's (its message was written
    for a person) rather than a library's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return True
    return tb.tb_frame.f_globals.get("__name__", "").split(".")[0] in OUR_PACKAGES


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").lower() not in {"", "0", "false", "no", "off"}


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (continuation lines joined with ' | ')."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class Terminated(BaseException):  # noqa: N818 - a signal, not an error
    """SIGTERM arrived (a pipeline timeout, ``kill``): unwinds like Ctrl-C so runs close as KILLED."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def reported_errors(who: str, *, debug: bool = False, params_file: str | None = None) -> Iterator[None]:
    """Turn a user error, Ctrl-C or SIGTERM inside the block into one line on stderr and an exit code.

    ``params_file`` is prefixed to a ``ConfigError`` that does not name its file already."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        yield
    except (KeyboardInterrupt, Terminated) as exc:
        debug = debug_enabled(debug)  # read now: a CLI's --debug sets the variable inside the block
        if debug:
            traceback.print_exc()
        print(f"{who}: {'interrupted' if isinstance(exc, KeyboardInterrupt) else 'terminated'}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM) from None
    except USER_ERRORS as exc:
        if not isinstance(exc, ConfigError) and not raised_by_arpipe(exc):
            raise  # a library's error: the traceback is the useful part
        debug = debug_enabled(debug)
        if debug:
            traceback.print_exc()
        message = one_line(exc)
        if isinstance(exc, ConfigError) and params_file and not message.startswith(str(params_file)):
            message = f"{params_file}: {message}"
        hint = "" if debug else f" ({DEBUG_ENV}=1 or --debug shows the traceback)"
        if isinstance(exc, ConfigError):
            hint = ""
        print(f"{who}: error: {message}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
