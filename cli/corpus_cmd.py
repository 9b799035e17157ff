"""`raeflow corpus`: parse flags, delegate to :mod:`raeflow.data.corpus`."""
from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("corpus")
    def corpus(
        rows: int = typer.Option(..., "--rows", "-n", help="Images to generate."),
        out: str = typer.Option(..., "--out", "-o", help="Output directory (must be new or empty)."),
        fmt: str = typer.Option("parquet", "--format", help="parquet (id, image, label, mnist_index) or folder "
                                "(<label>/<i>.png)."),
        seed: int = typer.Option(0, "--seed", help="Row i is the same image for the same seed."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    ):
        """Write N distinct images made from MNIST by seeded random affine distortions, in chunks."""
        from raeflow.cli.errors import fail
        from raeflow.data.corpus import write_corpus

        try:
            write_corpus(out, rows, fmt=fmt, seed=seed, log=(lambda s: None) if quiet else typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
