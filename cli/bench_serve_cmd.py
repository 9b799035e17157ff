"""`raeflow bench serve`: parses flags and delegates to ``raeflow.bench.serve``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from raeflow.errors import ConfigError


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("serve")
    def bench_serve(
        model: List[str] = typer.Option([], "--model", "-m", help="Denoiser run directories (repeatable); default: "
                                                                  "train a dense and a conv DAE into --workdir."),
        workdir: Path = typer.Option(Path("runs/bench-serve"), "--workdir", help="Where default models are "
                                                                                  "trained (once)."),
        requests: int = typer.Option(5000, "--requests", "-n", help="Requests per run (per concurrency)."),
        concurrency: List[int] = typer.Option([1, 8, 32], "--concurrency", "-c", help="Concurrent clients "
                                                                                      "(repeatable)."),
        mode: List[str] = typer.Option(["plain", "serve", "direct"], "--mode", help="Servers to load (repeatable): "
                                       "plain (uvicorn, no batching), serve (Ray Serve through its proxy), direct "
                                       "(Ray Serve, direct ingress)."),
        warmup: int = typer.Option(200, "--warmup"),
        threads: int = typer.Option(1, "--threads", help="torch threads, plain server and Serve replica alike."),
        max_batch_size: int = typer.Option(32, "--max-batch-size"),
        batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms"),
        max_ongoing_requests: int = typer.Option(64, "--max-ongoing-requests"),
        timeout_s: float = typer.Option(300, "--timeout", help="Wall-clock cap per run, seconds."),
        body: str = typer.Option("json", "--body", help="json: one image per request as JSON; npy: --batch images "
                                                        "per request as one .npy body (Content-Type "
                                                        "application/x-npy), answered as .npy."),
        batch: int = typer.Option(1, "--batch", help="Images per request with --body npy."),
        output: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON here."),
    ):
        """/denoise requests/s and p50/p99 latency: Ray Serve with batching against a plain uvicorn server."""
        from raeflow.bench.serve import bench_serve as run, ensure_models, markdown
        from raeflow.cli.errors import fail

        try:
            if requests < 1 or not concurrency or min(concurrency) < 1:
                raise ConfigError("--requests and every --concurrency must be at least 1")
            models = list(model) or ensure_models(workdir, typer.echo)
            report = run(models, requests=requests, concurrencies=concurrency, modes=mode, warmup=warmup,
                         threads=threads, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                         max_ongoing_requests=max_ongoing_requests, timeout_s=timeout_s, body=body, batch=batch,
                         log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        typer.echo("\n" + report["machine"] + "\n\n" + markdown(report))
        if output:
            output.write_text(json.dumps(report, indent=2))
            typer.echo(f"figures: {output}")
