"""How a command ends on a user's mistake: one red line on stderr and exit code 2 (a traceback means a bug)."""
from __future__ import annotations

import typer

#: what a user's input can raise (bad path, bad config, unknown name); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError, NotImplementedError)


def fail(e: Exception) -> None:
    """User errors end with one clear line and exit code 2."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
