"""`raeflow report`: one self-contained HTML page for one or more run directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: List[Path] = typer.Argument(..., help="Run directories (several: side by side)."),
        output: Path = typer.Option(Path("report.html"), "--output", "-o", help="The HTML file to write."),
        title: Optional[str] = typer.Option(None, "--title"),
    ):
        """Write an HTML report (plots embedded, nothing fetched from the network) of RUN_DIR [RUN_DIR ...]."""
        from raeflow.cli.errors import fail as _fail
        from raeflow.report import write_report

        try:
            path = write_report(runs, output, title=title)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            _fail(e)
        typer.echo(f"report: {path}")
