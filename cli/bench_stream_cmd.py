"""`raeflow bench stream`: parses flags and delegates to ``raeflow.bench.stream``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("stream")
    def bench_stream(
        rows: int = typer.Option(200_000, "--rows", help="Corpus rows for the streamed vs materialised ratio."),
        large_rows: int = typer.Option(2_000_000, "--large-rows", help="Corpus rows streamed alone for the "
                                                                      "memory at scale (0: skip)."),
        workers: int = typer.Option(1, "--workers", "-w", help="Ray Train workers, the same on every side."),
        batch_size: int = typer.Option(512, "--batch-size", "-b"),
        workdir: Path = typer.Option(Path("runs/bench-stream"), "--workdir", help="Corpora (written once, reused) "
                                                                                 "and run directories."),
        output: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON here."),
        memory_only: bool = typer.Option(False, "--memory-only", help="Streamed sides only (--rows and "
                                                                      "--large-rows): memory at scale, no ratio."),
    ):
        """One epoch of the dense AE streamed by Ray Data vs read into memory, and peak PSS of all processes."""
        from raeflow.bench.stream import run_bench
        from raeflow.cli.errors import fail

        try:
            report = run_bench(rows=rows, large_rows=large_rows or None, workers=workers, batch_size=batch_size,
                               workdir=workdir, memory_only=memory_only, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        if output:
            output.write_text(json.dumps(report, indent=2))
            typer.echo(f"figures: {output}")
