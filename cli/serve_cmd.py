"""`raeflow serve`."""
from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _serve():
        """Not available in this version yet."""
        from raeflow.cli.main import not_yet

        not_yet("serve")
