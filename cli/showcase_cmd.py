"""`raeflow showcase`: the README's main job."""
from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("showcase")
    def showcase(
        output: str = typer.Option("runs/showcase", "--output", "-o", help="Where runs, embeddings and the report go."),
        epochs: int = typer.Option(2, "--epochs", "-e", help="Epochs for each of the two models."),
        workers: int = typer.Option(2, "--workers", "-w", help="Ray Train workers and Ray Data encoder actors."),
        hidden: Optional[List[int]] = typer.Option(None, "--hidden", help="DAE hidden widths (repeat; default 512 128)."),
        latent_dim: int = typer.Option(32, "--latent-dim", "-k", help="DAE code size (the VAE's is 2, for its manifold)."),
    ):
        """Train a DAE and a VAE on Ray Train, embed MNIST test with Ray Data, search, serve, and report."""
        from raeflow.cli.errors import fail
        from raeflow.showcase import showcase as run

        try:
            run(output, epochs=epochs, workers=workers, hidden=hidden or None, latent_dim=latent_dim)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
