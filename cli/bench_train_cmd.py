"""`raeflow bench train`: parses flags and delegates to ``raeflow.bench.train``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from raeflow.errors import ConfigError


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("train")
    def bench_train(
        epochs: int = typer.Option(3, "--epochs", "-e", help="Epochs per contender (the first is excluded)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N MNIST training rows."),
        batch_size: int = typer.Option(128, "--batch-size", "-b"),
        threads: Optional[int] = typer.Option(None, "--threads", help="Total torch threads per contender "
                                                                      "(default: all cores)."),
        workers: List[int] = typer.Option([1, 2], "--workers", "-w", help="Ray Train worker counts (repeatable)."),
        no_ray: bool = typer.Option(False, "--no-ray", help="Only the in-process contenders."),
        no_local: bool = typer.Option(False, "--no-local", help="Skip raeflow's --local Trainer."),
        output: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON here."),
    ):
        """Samples/s of ae 784-1000-500-250-30 on MNIST: plain PyTorch loop vs raeflow's Trainer vs Ray Train."""
        from raeflow.bench.train import run_bench
        from raeflow.cli.errors import fail

        try:
            if min(workers, default=1) < 1:
                raise ConfigError("every --workers must be at least 1")
            report = run_bench(epochs=epochs, limit=limit, batch_size=batch_size, threads=threads,
                               workers=() if no_ray else tuple(workers), local=not no_local, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        if output:
            output.write_text(json.dumps(report, indent=2))
            typer.echo(f"figures: {output}")
