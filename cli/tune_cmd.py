"""`raeflow tune`: a hyperparameter search over a run config on Ray Tune (see raeflow.tune)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("tune")
    def _tune(
        config: Path = typer.Option(..., "--config", "-c", help="The base YAML run config."),
        space: List[str] = typer.Option(..., "--space", help="KEY=DIST, e.g. train.lr='loguniform(1e-4,1e-2)'; "
                                                             "DIST: choice(..), uniform(a,b), loguniform(a,b), "
                                                             "grid(..). Repeat for more axes."),
        metric: str = typer.Option(..., "--metric", help="Validation metric to select by, e.g. val_loss."),
        output: str = typer.Option(..., "--output", "-o", help="Directory for trials/, trials.csv/.md, best.yaml."),
        mode: str = typer.Option("min", "--mode", help="min or max."),
        trials: Optional[int] = typer.Option(None, "--trials", "-n",
                                             help="Samples (default 8; with grid(): 1 per grid point)."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha: stop poor trials early."),
        grace: int = typer.Option(1, "--grace", help="ASHA: epochs every trial runs before it may be stopped."),
        cpus_per_trial: float = typer.Option(0.5, "--cpus-per-trial", help="Fractional CPUs per trial."),
        max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials at once."),
        set_: List[str] = typer.Option([], "--set", help="Dotted override of the base config."),
        finetune: Optional[Path] = typer.Option(
            None, "--finetune", help="Then fine-tune each trial's encoder as a classifier with this run config "
                                     "(train.*, data.dataset, model: {dropout, head_hidden}); --space "
                                     "finetune.train.lr=... searches it; select by its val_error."),
        evaluate: List[str] = typer.Option([], "--evaluate", help="Then measure the chosen trial, and only it, "
                                           "on the test split: a raeflow eval task (repeat); writes test.json."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (or RAY_ADDRESS)."),
    ):
        """Search hyperparameters with Ray Tune; each trial is an ordinary raeflow run trained in-process."""
        from raeflow.cli.common import build_run_config
        from raeflow.cli.errors import USER_ERRORS, fail
        from raeflow.tune import load_finetune_config, parse_space, tune_runs

        try:
            base = build_run_config(config, set_)
            ft = load_finetune_config(finetune, base) if finetune is not None else None
            tune_runs(base, parse_space(space), metric=metric, mode=mode, trials=trials, scheduler=scheduler,
                      grace_epochs=grace, cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent,
                      output=output, address=address, finetune=ft, evaluate=evaluate,
                      log=typer.echo)
        except USER_ERRORS as e:
            fail(e)
