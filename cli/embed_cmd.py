"""`raeflow embed`, `raeflow search`: parse flags, delegate to :mod:`raeflow.embed`."""
from __future__ import annotations

from raeflow import strict_json
from typing import Optional

import typer
from raeflow.errors import ConfigError


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("embed")
    def embed(
        model: str = typer.Option(..., "--model", "-m", help="Run directory (or its model/ directory)."),
        input: str = typer.Option(..., "--input", "-i", help="Folder of images or .txt files, .parquet file or "
                                  "folder, .jsonl file, or a built-in dataset: mnist:test, 20newsgroups:test."),
        output: str = typer.Option(..., "--output", "-o", help="Output directory (Parquet dataset)."),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", help="On CPUs: encoding tasks at once "
                                              "(default: one per CPU); with --gpu: encoder actors (default: one "
                                              "per GPU)."),
        gpu: bool = typer.Option(False, "--gpu", help="One GPU per encoder actor."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Rows per encoder call "
                                                 "(default 1024 on CPU, 4096 on GPU)."),
        id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet column / JSON field holding "
                                                "row ids (default: 'id' when present, else the row number)."),
        text_column: Optional[str] = typer.Option(None, "--text-column", help="Column / field with the "
                                                  "documents (default 'text')."),
        image_column: Optional[str] = typer.Option(None, "--image-column", help="Parquet column with encoded "
                                                   "images or pixel arrays (default 'image')."),
        resume: bool = typer.Option(False, "--resume", help="Finish an interrupted job in --output: skip the "
                                    "rows already written."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (or RAY_ADDRESS)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Embed a corpus with a trained model into Parquet (id, embedding, label), on Ray Data."""
        from raeflow.cli.errors import fail
        from raeflow.embed.job import run_embed

        if text_column and image_column:
            fail(ConfigError("give --text-column or --image-column, not both"))
        try:
            run_embed(model, input, output, workers=workers, gpu=gpu, batch_size=batch_size, id_column=id_column,
                      text_column=text_column, image_column=image_column, resume=resume, address=address,
                      progress=not quiet, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)

    @app.command("search")
    def search(
        embeddings: str = typer.Option(..., "--embeddings", "-e", help="A `raeflow embed` output directory."),
        model: str = typer.Option(..., "--model", "-m", help="The model that made the embeddings."),
        query: str = typer.Option(..., "--query", "-q", help="An image or .txt file, a built-in row such as "
                                  "mnist:test:17, or (document models) the text itself."),
        k: int = typer.Option(10, "-k", help="Neighbours to return."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        exact: bool = typer.Option(False, "--exact", help="Compare with every embedding even when `raeflow "
                                   "index` built an index."),
    ):
        """The k nearest embeddings to a query, by cosine similarity (the ANN index when there is one)."""
        from raeflow.cli.errors import fail
        from raeflow.embed.search import format_hits, search as run_search

        try:
            result = run_search(embeddings, model, query, k, exact=exact)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        typer.echo(strict_json.dumps(result, indent=2) if as_json else format_hits(result))
