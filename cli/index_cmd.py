"""`raeflow index`: parse flags, delegate to :mod:`raeflow.index`."""
from __future__ import annotations

import json
from typing import List, Optional

import typer
from raeflow.errors import ConfigError


def _params(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE, e.g. ef_search=128")
        out[key.strip()] = json.loads(value)
    return out


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("index")
    def index(
        embeddings: str = typer.Option(..., "--embeddings", "-e", help="A `raeflow embed` output directory."),
        kind: Optional[str] = typer.Option(None, "--kind", help="hnsw (default: fastest, all vectors in memory) "
                                           "or ivfpq (compressed codes + exact re-ranking from disk)."),
        param: List[str] = typer.Option([], "--param", "-p", help="Kind parameter NAME=VALUE, e.g. ef_search=128, "
                                        "nprobe=32, M=32, nlist=4096."),
        rebuild: bool = typer.Option(False, "--rebuild", help="Start over (default: add the part files a later "
                                     "`raeflow embed --resume` committed)."),
        threads: int = typer.Option(1, "--threads", help="faiss threads for the build."),
        as_json: Optional[str] = typer.Option(None, "--json", help="Also write the build summary as JSON here."),
    ):
        """Build an ANN index beside the embeddings (or add new rows to it); search and /search then use it."""
        from raeflow.cli.errors import fail
        from raeflow.index import build_index

        try:
            summary = build_index(embeddings, kind, _params(param) or None, rebuild=rebuild, threads=threads,
                                  log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        if as_json:
            from dataclasses import asdict
            from pathlib import Path

            Path(as_json).write_text(json.dumps(asdict(summary), indent=2))
