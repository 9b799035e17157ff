"""`raeflow embed`, `raeflow search`."""
from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("embed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _embed():
        """Not available in this version yet."""
        from raeflow.cli.main import not_yet

        not_yet("embed")

    @app.command("search", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _search():
        """Not available in this version yet."""
        from raeflow.cli.main import not_yet

        not_yet("search")
