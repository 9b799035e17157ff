"""How a command ends: a user's mistake is one red line on stderr and exit code 2; a bug keeps its traceback.

The sorting is :mod:`raeflow.errors`' taxonomy (``UserError`` and the foreign exceptions that stand for one), not a
list of built-in types: a ``ValueError`` from deep inside numpy is a bug and must show where it happened.
"""
from __future__ import annotations

import typer

from raeflow.errors import UserError, as_user_error

#: kept for callers that catch "what a user can cause" explicitly
USER_ERRORS = (UserError,)


def fail(e: BaseException) -> None:
    """Called from a command's ``except Exception``: a user error ends with one clear line and exit code 2;
    anything else is re-raised unchanged (traceback, exit 1)."""
    user = as_user_error(e)
    if user is None:
        raise e
    typer.secho(f"error: {user}", fg=typer.colors.RED, err=True)
    raise typer.Exit(user.exit_code)
