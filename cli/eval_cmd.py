"""`raeflow eval`: the literature's measures for a trained model (tasks live in raeflow.evaluate.TASKS)."""
from __future__ import annotations

from raeflow import strict_json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: str = typer.Option(..., "--model", "-m", help="Run directory (or its model/ directory)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                              help="Dataset (its test split); default: the model's own."),
        task: List[str] = typer.Option([], "--task", "-t", help="reconstruction | probe | classify | likelihood | "
                                       "parzen | denoise | retrieval | all (repeat; default: all that apply)."),
        k: int = typer.Option(200, "--k", help="Importance samples for the likelihood task."),
        binarisation: str = typer.Option("both", "--binarisation",
                                         help="Likelihood protocol: fixed | dynamic | both (k=5000 on one "
                                              "protocol costs what k=1250 on both does)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where eval-*.json/.md go "
                                              "(default RUN_DIR/eval)."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ):
        """Evaluate a trained model: prints and saves (JSON + Markdown) every task that applies."""
        from raeflow.cli.errors import fail
        from raeflow.evaluate import evaluate_run, to_markdown

        tasks = None if not task or task == ["all"] else task
        try:
            res, paths = evaluate_run(model, dataset, tasks, {"k": k, "binarisation": binarisation}, output,
                                      log=(lambda s: None) if as_json else typer.echo)
        except Exception as e:  # noqa: BLE001 - fail() re-raises what is not a user error
            fail(e)
        if as_json:
            typer.echo(strict_json.dumps(res, indent=2))
        else:
            typer.echo(to_markdown(res))
            typer.echo(f"saved: {paths[0]} and {paths[1]}")
