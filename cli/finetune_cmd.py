"""`raeflow finetune`: a trained autoencoder's encoder + a softmax head, trained on a labelled dataset."""
from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("finetune")
    def _finetune(
        model: str = typer.Option(..., "--model", "-m", help="Run or model directory of a trained autoencoder."),
        dataset: str = typer.Option(..., "--dataset", "-d", help="Labelled data: built-in name or a path."),
        output: Optional[str] = typer.Option(None, "--output", "-o",
                                             help="Run directory (default runs/<variant>-finetune-<time>)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", "-e"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Data-parallel Ray Train workers."),
        head_hidden: Optional[int] = typer.Option(None, "--head-hidden",
                                                  help="A dense ReLU layer of this width before the softmax."),
        dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the encoder's features and the head."),
        set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.weight_decay=1e-4."),
        local: bool = typer.Option(False, "--local", help="Train in this process without Ray."),
    ):
        """Fine-tune a trained autoencoder's encoder into a classifier (selected by validation error)."""
        from raeflow.cli.errors import fail
        from raeflow.finetune import finetune

        try:
            finetune(model, dataset, output, epochs=epochs, lr=lr, batch_size=batch_size, workers=workers,
                     head_hidden=head_hidden, dropout=dropout, local=local, sets=set_)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
