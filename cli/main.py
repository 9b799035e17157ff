"""The ``raeflow`` command: parses arguments and delegates to the library. No logic lives here."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from raeflow.version import __version__
from raeflow.cli.errors import fail

app = typer.Typer(help="Train, run and serve the autoencoder family on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool):
    if value:
        typer.echo(f"raeflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    # Before any subcommand can import Ray: Ray reads part of its environment once, at its first import.
    from raeflow.raycluster import apply_env

    apply_env()


@app.command()
def variants():
    """List the autoencoder variants, one line each."""
    from raeflow.registry import variant_summaries

    for name, summary in variant_summaries().items():
        typer.echo(f"{name:<12} {summary}")


@app.command()
def datasets():
    """List the built-in datasets and how to use your own data."""
    from raeflow.data.catalog import known_datasets

    for name, ds in sorted(known_datasets().items()):
        typer.echo(f"{name:<14} {ds.kind:<6} {ds.summary}")
    typer.echo("\nOr a path: a folder of images (subfolders = classes), a folder of .txt files, a .jsonl file "
               "with a 'text' field, or Parquet with an 'image' or 'text' column.")


@app.command()
def train(
    variant: Optional[str] = typer.Option(None, "--variant", "-v",
                                          help="Variant name (see `raeflow variants`); default: the config's, else ae."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Built-in name, name:split or a path."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Data-parallel Ray Train workers."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", "-k"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config; flags override it."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set model.hidden=[500,250]."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory (default runs/<variant>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its latest checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Shared checkpoint storage URI."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (or RAY_ADDRESS); with "
                                          "token authentication also RAY_AUTH_MODE=token and the cluster's token."),
    local: bool = typer.Option(False, "--local", help="Train in this process without Ray (debugging, baseline)."),
    track: List[str] = typer.Option([], "--track", help="Also log to mlflow | tensorboard (repeatable)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow server/store URI (default: <output root>/mlflow.db)."),
):
    """Train a variant (on Ray Train unless --local) and write its run directory."""
    from raeflow.cli.common import build_run_config, given_keys
    from raeflow.train.run import train as run_train

    try:
        flags = dict(variant=variant, dataset=dataset, workers=workers, gpu=gpu, epochs=epochs, batch_size=batch_size,
                     lr=lr, latent_dim=latent_dim, output=output, seed=seed, storage_path=storage_path,
                     address=address, track=track or None, tracking_uri=tracking_uri)
        cfg = build_run_config(config, set_, **flags)
        given, recipe = given_keys(config, set_, **flags)
        run_train(cfg, resume=resume, local=local, given=given, recipe=recipe)
    except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
        fail(e)


# Each command family lives in its own module with a `register(app)`; `bench` is a group its modules extend.
bench_app = typer.Typer(help="Benchmarks that print side-by-side ratios (see BENCHMARKS.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

from raeflow.cli import (bench_embed_cmd, bench_index_cmd, bench_serve_cmd, bench_stream_cmd, bench_train_cmd,  # noqa: E402
                         corpus_cmd, embed_cmd, eval_cmd, export_cmd, finetune_cmd, index_cmd, report_cmd,
                         serve_cmd, showcase_cmd, tune_cmd)

for _module in (finetune_cmd, tune_cmd, embed_cmd, index_cmd, corpus_cmd, serve_cmd, eval_cmd, report_cmd,
                export_cmd, showcase_cmd, bench_serve_cmd, bench_embed_cmd, bench_train_cmd, bench_index_cmd,
                bench_stream_cmd):
    _module.register(app, bench_app)

if __name__ == "__main__":  # pragma: no cover
    app()
