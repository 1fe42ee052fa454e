"""What every scopecast command prints on the terminal, and the one place that turns a user's
mistake into one red ``error:`` line and exit code 2.

A command never catches a :class:`~calibration.errors.ScopecastError` (nor pydantic's
ValidationError, nor OSError) to report it: it lets it rise, and :func:`exit_on_user_errors`
(inside :class:`ScopecastGroup` and :func:`run_app`) reports it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from calibration.errors import ScopecastError

out = Console()
err = Console(stderr=True, soft_wrap=True)

#: the longest error line printed; longer messages are cut (they should be short at the source)
MAX_ERROR_CHARS = 400

#: what a user can get wrong (a bad option, file, endpoint, engine, config): one line, exit 2
USER_ERRORS: tuple[type[Exception], ...] = (ScopecastError, ValidationError, OSError)


def describe(e: BaseException) -> str:
    """An exception's message; pydantic's several-line report as 'field: problem; ...'."""
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, x['loc'])) or e.title}: {x['msg']}" for x in e.errors()
        )
    return str(e) or type(e).__name__


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut to
    ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def error(message: str) -> None:
    """One red ``error:`` line on stderr."""
    err.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False)


def warning(message: str) -> None:
    """One yellow ``warning:`` line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {escape(one_line(message))}", highlight=False)


def progress() -> Progress:
    """A transient progress bar on stderr: description, bar, n/total, status, elapsed."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


@contextmanager
def exit_on_user_errors() -> Iterator[None]:
    """A user's mistake raised in the block (:data:`USER_ERRORS`) becomes one red ``error:``
    line and exit code 2 (``typer.Exit(2)``), not a traceback. Exits already decided
    (``typer.Exit``, click's usage errors) pass through as they are."""
    try:
        yield
    except typer.Exit:  # a RuntimeError too: an exit already decided stays as it is
        raise
    except USER_ERRORS as e:
        error(describe(e))
        raise typer.Exit(2) from None


class ScopecastGroup(TyperGroup):
    """A typer group whose commands report user mistakes through :func:`exit_on_user_errors`;
    the ``scopecast`` root, ``scopecast calibrate`` and ``scopecast bench`` use it, so their
    apps behave the same when run by ``scopecast``, ``python -m bench`` or typer's CliRunner."""

    def invoke(self, ctx: Any) -> Any:
        with exit_on_user_errors():
            return super().invoke(ctx)


def run_app(app: typer.Typer, prog_name: str, args: list[str] | None = None) -> None:
    """Run a typer ``app`` as a program (``scopecast``, ``python -m bench``): a user mistake
    anywhere, also while options are converted before any command runs, is one ``error:``
    line and exit code 2; typer's usage errors and ``typer.Exit`` codes stay as they are."""
    try:
        with exit_on_user_errors():
            app(args=args, prog_name=prog_name)
    except typer.Exit as e:
        sys.exit(e.exit_code)
