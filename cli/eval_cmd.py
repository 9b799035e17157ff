"""`raeflow eval`: one task -> one function; adding a task is one entry in TASKS."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer


def _retrieval(model: str, dataset: str, plot: Optional[Path], as_json: bool) -> dict[str, Any]:
    from raeflow.embed.retrieval import default_plot_path, format_table, plot_retrieval, retrieval

    result = retrieval(model, dataset, log=(lambda s: None) if as_json else typer.echo)
    result["plot"] = str(plot_retrieval(result, plot or default_plot_path(model, result)))
    if not as_json:
        typer.echo(format_table(result))
        typer.echo(f"\nplot: {result['plot']}")
    return result


#: task name -> function(model, dataset, plot path or None, as_json) returning a JSON-able dict.
TASKS: dict[str, Callable[[str, str, Optional[Path], bool], dict[str, Any]]] = {
    "retrieval": _retrieval,
}


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: str = typer.Option(..., "--model", "-m", help="Run directory (or its model/ directory)."),
        dataset: str = typer.Option(..., "--dataset", "-d", help="Built-in dataset (test split by default)."),
        task: str = typer.Option("retrieval", "--task", "-t", help=f"One of: {', '.join(TASKS)}."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="PNG path (default RUN_DIR/plots/<task>-...)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """Evaluate a trained model on a task."""
        from raeflow.cli.main import USER_ERRORS, _fail

        if task not in TASKS:
            _fail(ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}"))
        try:
            result = TASKS[task](model, dataset, plot, as_json)
        except USER_ERRORS as e:
            _fail(e)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
