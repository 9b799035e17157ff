"""`raeflow bench embed`: parses flags and delegates to ``raeflow.bench.embed``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("embed")
    def bench_embed(
        rows: int = typer.Option(1_000_000, "--rows", "-n", help="Corpus size (MNIST repeated)."),
        memory_rows: int = typer.Option(100_000, "--memory-rows", help="The smaller corpus memory is compared at."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="An MNIST model (default: the dense "
                                            "784-1000-500-250-30 AE with random weights)."),
        workdir: Optional[str] = typer.Option(None, "--workdir", help="Keep corpora and outputs here (default: a "
                                              "temporary folder, deleted at the end)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Encoder actors for raeflow embed."),
        output: Optional[Path] = typer.Option(None, "--json", help="Also write every figure as JSON here."),
    ):
        """Rows/s of `raeflow embed` against a plain single-process loop, and its peak memory at two sizes."""
        from raeflow.bench.embed import bench_embed as run, markdown
        from raeflow.cli.errors import fail

        try:
            report = run(rows, memory_rows=memory_rows, model=model, workdir=workdir, batch_size=batch_size,
                         workers=workers, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        typer.echo("\n" + markdown(report))
        if output:
            output.write_text(json.dumps(report, indent=2))
