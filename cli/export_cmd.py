"""`raeflow export`: a trained model's deterministic graphs as ONNX (samplers stay in raeflow)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from raeflow.errors import ConfigError


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run: Path = typer.Argument(..., help="Run directory (or its model/ directory)."),
        format: str = typer.Option("onnx", "--format", "-f", help="Export format: onnx."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory (default RUN_DIR/onnx)."),
    ):
        """Export encoder / decoder / reconstruct / denoise graphs (whichever the model declares), batch dynamic."""
        from raeflow.cli.errors import fail as _fail
        from raeflow.export import FORMATS, export_onnx

        try:
            if format not in FORMATS:
                raise ConfigError(f"unknown --format {format!r}; use one of {list(FORMATS)}")
            export_onnx(run, output, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            _fail(e)
