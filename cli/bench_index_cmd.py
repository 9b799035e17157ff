"""`raeflow bench index`: parses flags and delegates to ``raeflow.bench.index``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("index")
    def bench_index(
        embeddings: str = typer.Option(..., "--embeddings", "-e", help="A `raeflow embed` output directory (its "
                                       "_index is rebuilt for each kind)."),
        model: str = typer.Option(..., "--model", "-m", help="The model that made the embeddings (encodes the "
                                  "queries)."),
        corpus: Optional[str] = typer.Option(None, "--corpus", help="A `raeflow corpus` directory to embed into "
                                             "--embeddings first (in this process, one thread) when that is empty."),
        kind: List[str] = typer.Option(["hnsw", "ivfpq"], "--kind", help="Kinds to build and measure."),
        queries: str = typer.Option("mnist:test", "--queries", help="Built-in rows used as queries."),
        recall_queries: int = typer.Option(1000, "--recall-queries", help="Queries recall is averaged over."),
        budget: float = typer.Option(20.0, "--budget", help="Seconds per one-at-a-time timing."),
        build_threads: int = typer.Option(1, "--build-threads", help="faiss threads for each build (queries are "
                                          "timed on one thread whatever this is)."),
        output: Optional[Path] = typer.Option(None, "--json", help="Also write every figure as JSON here."),
    ):
        """Recall@10 and queries/s of the ANN index against the exact search, build time and memory."""
        from raeflow.bench.index import bench_index as run, markdown
        from raeflow.cli.errors import fail

        try:
            from pathlib import Path as _P

            if corpus and not any(_P(embeddings).glob("part-*.parquet")):
                from raeflow.bench.index import embed_corpus

                typer.echo(f"embedded: {embed_corpus(corpus, model, embeddings, log=typer.echo)}")
            report = run(embeddings, model, kinds=kind, queries=queries, recall_queries=recall_queries,
                         single_budget_s=budget, build_threads=build_threads, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        typer.echo("\n" + markdown(report))
        if output:
            output.write_text(json.dumps(report, indent=2))
