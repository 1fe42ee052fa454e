"""scopecast's error root, and the errors raised by calibration fits.

This is the bottom layer, so every package (calibration, engines, stream, bench) derives its
errors from :class:`ScopecastError` here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ScopecastError(Exception):
    """The root of every scopecast error. Any ScopecastError is a user-facing problem: its
    message names the bad value (option, file, endpoint, engine, frame) and says what to do.
    The ``scopecast`` command prints it as one red ``error:`` line and exits 2, without a
    traceback; a bug is never a ScopecastError. Subclasses keep a stdlib base as well
    (``class ProtocolError(ScopecastError, ValueError)``) so ``except ValueError`` still
    catches them."""


class CalibrationError(ScopecastError, ValueError):
    """Data that cannot give a trustworthy calibration; the message says what to change."""


class InvalidInput(ScopecastError, ValueError):
    """A value given on the command line that a command cannot use; also a library's plain
    ValueError re-raised by :func:`user_mistakes` where its arguments came from the user."""


class MissingExtra(ScopecastError, ImportError):
    """A command needs an optional extra that is not installed; the message names the pip
    command that installs it."""


@contextmanager
def user_mistakes(*types: type[Exception]) -> Iterator[None]:
    """Within the block, an exception of ``types`` (say ValueError from a library's argument
    checks, fed straight from the command line) is the user's mistake: it is re-raised as
    :class:`InvalidInput` with the same message. ScopecastErrors and pydantic's
    ValidationError pass through unchanged (the command line formats those itself)."""
    try:
        yield
    except ScopecastError:
        raise
    except types as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            raise
        raise InvalidInput(str(e) or type(e).__name__) from e
