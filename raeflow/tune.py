"""``raeflow tune``: hyperparameter search over a run config, on Ray Tune.

Each trial is an ordinary raeflow run (its own run directory with run.yaml, metrics, checkpoints, plots, model;
``raeflow train --resume -o DIR`` continues it) trained in-process inside the trial's Tune actor. Not a nested
Ray Train ``TorchTrainer``: that needs CPUs for its own worker group besides the trial's, and on two CPUs the
nested form hangs (REFERENCE.md). Trials take a fraction of a CPU and one torch thread each.

Selection is on a validation metric only (``val_...``): the test split is for the final report, never for
choosing. Every epoch of the run's last stage is reported to Tune, so an ASHA scheduler can stop poor trials
early; a staged model (sdae: layer-wise pretraining, then supervised fine-tuning) is judged on that last stage
alone, since its earlier stages lack the metric (``val_error``) or log another quantity under its name
(``val_loss`` is a reconstruction while pretraining, a cross-entropy while fine-tuning). The search writes
``DIR/trials.csv``, ``DIR/trials.md`` and ``DIR/best.yaml`` (the base config with the chosen values).
``evaluate=`` (the CLI's ``--evaluate TASK``) then measures the chosen trial, and only it, on the test split once
(``raeflow eval``'s tasks) and writes ``DIR/test.json``: the choice and its test figure in one place, made by the
same command that made the choice, so no script between them can pick a trial by its test score.

Pretrain, then fine-tune (``finetune=``, the CLI's ``--finetune FT.yaml``): each trial trains the autoencoder of
the base config (``trials/ID/pretrain``), then fine-tunes its encoder as a classifier (``trials/ID/finetune``) with
the fine-tuning config: its ``train`` section, ``data.dataset`` (the labels) and ``model: {dropout, head_hidden}``
(the head). Axes named ``finetune.train.lr`` search the fine-tuning config, the others the autoencoder's, so one
grid covers a pretraining setting (Rifai et al.'s contraction weight, Vincent et al.'s noise level) and the
fine-tuning schedule together. Only fine-tuning epochs are reported: the metric is the classifier's (``val_error``),
and the pretraining has none to compare. ``best-finetune.yaml`` holds the chosen fine-tuning config.
Trials whose autoencoder configs are the same (a grid's fine-tuning axis) share one pretraining run,
``DIR/pretrain/<config hash>``, trained once under a file lock: on two cores the pretraining is most of a trial
(a contractive AE: 30 epochs against 50 fine-tuning epochs of a one-layer classifier).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from raeflow.errors import ConfigError, RunExistsError
from raeflow.config import RunConfig, _number

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid")
FINETUNE = "finetune."  # --space keys with this prefix set the fine-tuning config
_DIST = re.compile(r"^\s*(choice|uniform|loguniform|grid)\s*\((.*)\)\s*$", re.S)


@dataclass
class Dist:
    """One axis of the search: ``choice(a, b)``, ``uniform(lo, hi)``, ``loguniform(lo, hi)``, ``grid(a, b)``."""

    kind: str
    args: list[Any]

    @classmethod
    def parse(cls, text: str) -> "Dist":
        m = _DIST.match(text)
        if not m:
            raise ConfigError(f"cannot read {text!r} as a distribution; use one of "
                             f"{', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
        kind, inner = m.group(1), m.group(2)
        args = [_number(a) for a in (yaml.safe_load(f"[{inner}]") or [])]  # YAML: 1e-3, [500, 250], 'relu'
        if not args:
            raise ConfigError(f"{kind}() needs values")
        if kind in ("uniform", "loguniform"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise ConfigError(f"{kind}(lo, hi) takes two numbers lo < hi; got {text!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"loguniform needs lo > 0; got {text!r}")
        return cls(kind, args)

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.args)
        if self.kind == "grid":
            return tune.grid_search(self.args)
        if self.kind == "uniform":
            return tune.uniform(float(self.args[0]), float(self.args[1]))
        return tune.loguniform(float(self.args[0]), float(self.args[1]))


def parse_space(assignments: list[str]) -> dict[str, Dist]:
    """``["train.lr=loguniform(1e-4, 1e-2)", ...]`` -> {"train.lr": Dist}."""
    space: dict[str, Dist] = {}
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--space takes KEY=DIST, got {a!r}")
        key, dist = a.split("=", 1)
        key = key.strip()
        if key in space:
            raise ConfigError(f"--space {key} given twice")
        space[key] = Dist.parse(dist)
    if not space:
        raise ConfigError("give at least one --space KEY=DIST")
    return space


def split_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's values -> (the autoencoder config's, the fine-tuning config's with ``finetune.`` dropped)."""
    return ({k: v for k, v in values.items() if not k.startswith(FINETUNE)},
            {k[len(FINETUNE):]: v for k, v in values.items() if k.startswith(FINETUNE)})


def load_finetune_config(path: str | Path, base: RunConfig) -> RunConfig:
    """The fine-tuning config at ``path``; without a ``data.dataset`` of its own, the labels are those of the
    autoencoder's dataset (the RunConfig default, mnist, would silently be another corpus)."""
    from raeflow.config import load_yaml
    from raeflow.finetune import head_options

    ft = RunConfig.from_yaml(path)
    raw = load_yaml(Path(path).read_text(), str(path)) or {}
    if "dataset" not in (raw.get("data") or {}):
        ft.data.dataset = base.data.dataset
    head_options(ft)  # refuse a model section that is not the head's, before any trial starts
    return ft


def apply(base: dict[str, Any], values: dict[str, Any]) -> RunConfig:
    """The base config (a RunConfig dict) with the dotted keys set to ``values`` (raises on unknown keys)."""
    d = copy.deepcopy(base)
    for key, value in values.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--space {key}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return RunConfig.from_dict(d)


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    best: float  # the metric's best value over the trial's epochs
    best_epoch: int
    epochs: int  # epochs it ran
    planned: int  # epochs it would have run without the scheduler stopping it
    run_dir: str
    error: str = ""

    @property
    def stopped_early(self) -> bool:
        return not self.error and self.epochs < self.planned


@dataclass
class TuneResult:
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow
    best_config: RunConfig
    output: Path
    files: list[Path] = field(default_factory=list)
    test: dict | None = None  # evaluate=: raeflow eval's results for the chosen trial's run (test split)


def shared_pretraining(cfg: RunConfig, root: str | Path, log: Callable[[str], None]) -> Path:
    """The run directory of ``cfg``'s autoencoder under ``root/pretrain/``, trained here unless a trial with the
    same config has trained it: one pretraining per distinct config. An exclusive ``flock`` serialises trials
    that need the same one (the second waits, then reuses it); a run left unfinished by a killed trial resumes
    from its checkpoint."""
    import fcntl

    from raeflow.train.run import train

    d = cfg.to_dict()
    d["output"] = None
    key = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_dir = Path(root) / "pretrain" / key
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (run_dir / "model" / "config.json").is_file():
            log(f"pretraining {run_dir} already trained by another trial: reused")
            return run_dir
        cfg.output = str(run_dir)
        train(cfg, local=True, log=log, resume=(run_dir / "run.yaml").is_file())
    return run_dir


def _trial(config: dict[str, Any], base: dict[str, Any], root: str, metric: str,
           finetune: dict[str, Any] | None, judged: str) -> None:
    """One trial: an ordinary in-process raeflow run, reporting every epoch to Tune; with ``finetune``, an
    autoencoder run and then the fine-tuning of its encoder, reporting the fine-tuning's epochs."""
    import torch
    from ray import tune

    from raeflow.train.run import train

    torch.set_num_threads(1)
    ctx = tune.get_context()
    pre_values, ft_values = split_values(config)
    cfg = apply(base, pre_values)
    cfg.train.threads = 1  # a fraction of a CPU each: one torch thread, or trials fight over the cores
    trial_dir = Path(root) / "trials" / ctx.get_trial_id()
    cfg.output = str(trial_dir)
    ft = None
    if finetune is not None:
        ft = apply(finetune, ft_values)
        ft.train.threads = 1
        ft.output = str(trial_dir / "finetune")
    reported_dir = cfg.output if ft is None else ft.output
    log_path = Path(root) / "logs" / f"{ctx.get_trial_id()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = log_path.open("a")

    def log(line: str) -> None:
        logf.write(line + "\n")
        logf.flush()

    # Only the ``judged`` stage's epochs are reported (module doc: a staged model's earlier stages log other
    # quantities under the same names, val_loss being a reconstruction there, or lack the metric).
    def on_epoch(r) -> None:
        if r.stage != judged:
            return
        if metric not in r.metrics:
            raise ConfigError(f"metric {metric!r} is not among this run's metrics {sorted(r.metrics)}")
        tune.report({metric: float(r.metrics[metric]), "epoch": r.epoch, "stage": r.stage,
                     "run_dir": reported_dir})

    try:
        if ft is None:
            train(cfg, local=True, log=log, on_epoch=on_epoch)
        else:
            from raeflow.finetune import finetune as run_finetune, head_options

            # pretraining: its metrics are not the classifier's, so not reported
            pretrained = shared_pretraining(cfg, root, log)
            trial_dir.mkdir(parents=True, exist_ok=True)
            if not (trial_dir / "pretrain").is_symlink():  # a restarted trial has linked it already
                (trial_dir / "pretrain").symlink_to(pretrained.resolve(), target_is_directory=True)
            run_finetune(pretrained, ft.data.dataset, ft.output, local=True, base=ft, on_epoch=on_epoch, log=log,
                         **head_options(ft))
    finally:
        logf.close()


def judged_stage(cfg: RunConfig) -> tuple[str, int]:
    """The stage a trial of ``cfg`` is judged on, its model's last, as (name, epochs when nothing stops it): the
    epochs reported to Tune. A fine-tuning config's is its classifier's one stage (:func:`judged_finetune_stage`)."""
    from raeflow.models.base import TrainPlan
    from raeflow.train.run import untrained_model

    model, _ = untrained_model(cfg)
    last = model.stages(TrainPlan(cfg.train.epochs, dict(cfg.train.stage_epochs)))[-1]
    return last.name, last.epochs


def judged_finetune_stage(ft: RunConfig) -> tuple[str, int]:
    """:func:`judged_stage` of a fine-tuning run: the classifier's one stage, ``finetune`` (read from the
    config, as the classifier is only built on a trial's own encoder)."""
    from raeflow.models.base import TrainPlan

    return "finetune", TrainPlan(ft.train.epochs, dict(ft.train.stage_epochs)).epochs_for("finetune")


def tune_runs(base: RunConfig, space: dict[str, Dist], *, metric: str, mode: str = "min", trials: int | None = None,
              scheduler: str | None = None, grace_epochs: int = 1, cpus_per_trial: float = 0.5,
              max_concurrent: int | None = None, output: str | Path, address: str | None = None,
              finetune: RunConfig | None = None, evaluate: Sequence[str] = (),
              log: Callable[[str], None] = print) -> TuneResult:
    """Search ``space`` around ``base``; every trial is an in-process raeflow run under ``output/trials/``.
    ``finetune``: each trial pretrains ``base`` and then fine-tunes its encoder with this config (module doc).
    ``evaluate``: raeflow eval tasks measured on the chosen trial's run once the choice is made (module doc)."""
    from raeflow.evaluate import TASKS, evaluate_run

    unknown = sorted(set(evaluate) - set(TASKS))
    if unknown:  # refused now, not after an hour of trials
        raise ConfigError(f"--evaluate {unknown}: unknown task(s); known: {sorted(TASKS)}")
    if not metric.startswith("val_"):
        raise ConfigError(f"--metric must be a validation metric (val_...), not {metric!r}: selecting on the "
                         "training or test split would report a biased figure")
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode is min or max, not {mode!r}")
    if scheduler not in (None, "asha"):
        raise ConfigError(f"unknown scheduler {scheduler!r}; use asha (or none)")
    if not 0 < cpus_per_trial:
        raise ConfigError("--cpus-per-trial must be positive")
    out = Path(output).resolve()
    if (out / "trials.csv").exists():
        raise RunExistsError(f"{out} already holds a search (trials.csv); choose another --output")
    base_dict = base.to_dict()
    base_dict["output"] = None
    ft_dict = None
    if finetune is not None:
        ft_dict = finetune.to_dict()
        ft_dict["output"] = None
    elif any(k.startswith(FINETUNE) for k in space):
        raise ConfigError(f"--space {next(k for k in space if k.startswith(FINETUNE))}: a finetune.* axis needs a "
                          "fine-tuning config (--finetune FT.yaml)")
    # Every axis must land on a real config key: try each with its first value before starting anything.
    pre_probe, ft_probe = split_values({k: d.args[0] for k, d in space.items()})
    judged, planned = judged_stage(apply(base_dict, pre_probe))
    if ft_dict is not None:
        judged, planned = judged_finetune_stage(apply(ft_dict, ft_probe))
    has_grid = any(d.kind == "grid" for d in space.values())
    num_samples = trials if trials is not None else (1 if has_grid else 8)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raeflow import raycluster

    raycluster.ensure_ray(address, owner="tune", log=log)
    try:
        sched = None
        if scheduler == "asha":
            # One training iteration = one epoch; rungs at grace, grace*2, ... up to the full plan. max_t one past
            # the plan: at max_t ASHA stops the trial itself, which would cut a finished run off after its last
            # report and before it saves its model (found on a 30-epoch search: the best trial had no model/).
            sched = ASHAScheduler(time_attr="training_iteration", max_t=planned + 1, grace_period=grace_epochs,
                                  reduction_factor=2)
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base_dict, root=str(out), metric=metric,
                                                             finetune=ft_dict, judged=judged), {"cpu": cpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.to_tune() for k, d in space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=sched,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name="ray-tune", storage_path=str(out), verbose=0),
        )
        grid = tuner.fit()
    finally:
        raycluster.shutdown_if_started("tune")

    rows = []
    for r in grid:
        df = r.metrics_dataframe
        trial_id = r.metrics.get("trial_id", "") if r.metrics else ""
        values = {k: r.config[k] for k in space}
        if df is None or metric not in df or df[metric].dropna().empty:
            rows.append(TrialRow(trial_id, values, math.nan, -1, 0, planned, "", str(r.error or "no metric")))
            continue
        series = df[metric]
        i = series.idxmin() if mode == "min" else series.idxmax()
        rows.append(TrialRow(str(df["trial_id"].iloc[0]), values, float(series[i]), int(df["epoch"][i]), len(df),
                             planned, str(df["run_dir"].iloc[0]), str(r.error or "")))
    ok = [r for r in rows if math.isfinite(r.best)]
    if not ok:
        raise RuntimeError(f"no trial reported {metric}; see {out / 'logs'}")
    best = (min if mode == "min" else max)(ok, key=lambda r: r.best)
    pre_best, ft_best = split_values(best.values)
    best_cfg = apply(base_dict, pre_best)
    best_cfg.output = None
    files = write_reports(out, rows, best, best_cfg, metric, mode, finetune=ft_dict is not None)
    if ft_dict is not None:
        best_ft = apply(ft_dict, ft_best)
        best_ft.output = None
        best_ft.save(out / "best-finetune.yaml")
        files.append(out / "best-finetune.yaml")
    log(f"best of {len(rows)} trials: {metric}={best.best:.6g} at epoch {best.best_epoch} with "
        + ", ".join(f"{k}={v}" for k, v in best.values.items()) + f"  (run {best.run_dir})")
    test = None
    if evaluate:
        res, _ = evaluate_run(best.run_dir, tasks=list(evaluate), log=log)
        test = {"trial": best.trial, "values": best.values, "metric": metric, "validation": best.best,
                "best_epoch": best.best_epoch, "run_dir": best.run_dir, "split": res["split"],
                "tasks": res["tasks"]}
        (out / "test.json").write_text(json.dumps(test, indent=1))
        with (out / "trials.md").open("a") as f:
            f.write(f"\nThe chosen trial {best.trial}, measured once on the {res['split']} split: test.json "
                    f"(and {best.run_dir}/eval).\n")
        files.append(out / "test.json")
    return TuneResult(metric, mode, rows, best, best_cfg, out, files, test)


def write_reports(out: Path, rows: list[TrialRow], best: TrialRow, best_cfg: RunConfig, metric: str,
                  mode: str, finetune: bool = False) -> list[Path]:
    keys = list(best.values)
    order = sorted(rows, key=lambda r: (not math.isfinite(r.best), r.best if mode == "min" else -r.best))
    header = ["trial", *keys, f"best_{metric}", "best_epoch", "epochs", "planned_epochs", "stopped_early",
              "run_dir", "error"]
    csv_path = out / "trials.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in order:
            w.writerow([r.trial, *[r.values[k] for k in keys], r.best, r.best_epoch, r.epochs, r.planned,
                        r.stopped_early, r.run_dir, r.error])
    md = [f"# raeflow tune: {len(rows)} trials, selected by {metric} ({mode})", "",
          "| " + " | ".join(["trial", *keys, metric, "epoch", "epochs run"]) + " |",
          "|" + "---|" * (len(keys) + 4)]
    for r in order:
        mark = " **(best)**" if r is best else ""
        ran = f"{r.epochs}/{r.planned}" + (" (stopped by scheduler)" if r.stopped_early else "")
        md.append("| " + " | ".join([r.trial + mark, *[str(r.values[k]) for k in keys], f"{r.best:.6g}",
                                     str(r.best_epoch), ran]) + " |")
    pre, ft = split_values(best.values)
    chosen = lambda vals: ", ".join(f"{k}={v}" for k, v in vals.items()) or "nothing changed"  # noqa: E731
    md += ["", f"best.yaml: the base config with {chosen(pre)}; "
           + (f"best-finetune.yaml: the fine-tuning config with {chosen(ft)}; each trial's runs are "
              "trials/ID/pretrain (a link into pretrain/, shared by trials with the same autoencoder config) and "
              "trials/ID/finetune." if finetune else
              "each trial's run directory is under trials/.")]
    md_path = out / "trials.md"
    md_path.write_text("\n".join(md) + "\n")
    best_path = out / "best.yaml"
    best_cfg.save(best_path)
    return [csv_path, md_path, best_path]
