"""`raeflow serve`: parses flags into a ServerSpec and delegates to ``raeflow.serve.run``."""
from __future__ import annotations

from typing import List, Optional

import typer
from raeflow.errors import ConfigError


def parse_indexes(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--index takes NAME=EMBEDDINGS_DIR, got {v!r}")
        if name in out:
            raise ConfigError(f"--index {name} given twice")
        out[name] = path
    return out


def parse_replicas(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--replicas takes a number or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--replicas must be at least 1, got {n}")
    return n


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: List[str] = typer.Option([], "--model", "-m", help="Run directory to serve (repeatable); served as "
                                                                  "/{run directory name}/..."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP proxy listens on."),
        port: Optional[int] = typer.Option(None, "--port", "-p", help="HTTP port (default 8000)."),
        replicas: str = typer.Option("1", "--replicas", help="Ingress replicas: a number, or 'auto' to autoscale "
                                                             "between --min-replicas and --max-replicas."),
        min_replicas: int = typer.Option(1, "--min-replicas"),
        max_replicas: int = typer.Option(2, "--max-replicas"),
        gpu: bool = typer.Option(False, "--gpu", help="One GPU per replica; models run on it."),
        index: List[str] = typer.Option([], "--index", help="NAME=EMBEDDINGS_DIR for POST /{model}/search "
                                                            "(repeatable)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (or RAY_ADDRESS); "
                                                                      "default: a local Ray instance."),
        max_batch_size: int = typer.Option(32, "--max-batch-size", help="Requests per batched model call."),
        batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="How long a batch waits to fill."),
        max_ongoing_requests: int = typer.Option(64, "--max-ongoing-requests", help="Per replica; at least the "
                                                                                    "batch size so batches fill."),
        num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPUs reserved per replica."),
        access_log: bool = typer.Option(False, "--access-log", help="Log every request (proxy and replica)."),
        direct_ingress: Optional[bool] = typer.Option(
            None, "--direct-ingress/--proxy", help="Direct ingress: replicas answer HTTP themselves on --port "
            "(replica i on port+i), the fast path (BENCHMARKS.md); the default when raeflow starts Ray itself. "
            "--proxy: through Serve's HTTP proxy, the default on a joined cluster (--address): one port in front "
            "of replicas on several nodes."),
        detach: bool = typer.Option(False, "--detach", help="Run in the background; return once healthy."),
        stop: bool = typer.Option(False, "--stop", help="Stop a detached server (the one on --port if given)."),
    ):
        """Serve models over HTTP with Ray Serve: /healthz, /models, /docs and /{model}/{endpoint}."""
        from raeflow.cli.errors import fail
        from raeflow.serve import run

        try:
            if stop:
                run.stop(port, log=typer.echo)
                return
            if max_batch_size < 1 or max_ongoing_requests < 1 or batch_wait_ms < 0:
                raise ConfigError("--max-batch-size and --max-ongoing-requests must be >= 1, --batch-wait-ms >= 0")
            spec = run.ServerSpec(
                models=list(model), indexes=parse_indexes(index), host=host,
                port=run.DEFAULT_PORT if port is None else port, address=address, access_log=access_log,
                direct_ingress=direct_ingress,
                options={"replicas": parse_replicas(replicas), "min_replicas": min_replicas,
                         "max_replicas": max_replicas, "gpu": gpu, "max_batch_size": max_batch_size,
                         "batch_wait_timeout_s": batch_wait_ms / 1000.0,
                         "max_ongoing_requests": max_ongoing_requests, "num_cpus": num_cpus})
            if detach:
                run.detach(spec, log=typer.echo)
            else:
                run.serve_forever(spec, log=typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
