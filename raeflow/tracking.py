"""Experiment tracking: a run also logged to MLflow and/or TensorBoard, beside its ``metrics.jsonl``.

``raeflow train --track mlflow --track tensorboard`` (or ``tracking.backends`` in the config) opens one
:class:`Tracker` per run directory. It is fed the same rows ``metrics.jsonl`` gets, in the driver process: the
in-process trainer's rows, and under Ray Train rank 0's rows as the driver's relay writes them, so exactly one
process logs, whatever the number of workers (no tracker runs inside the workers).

What is logged: the resolved config as params (dotted keys: ``train.lr``), every epoch's numeric metrics at
``step = epoch``, tags (variant, dataset, raeflow version, git commit when the code is a git checkout) and, at
the end, ``plots/`` and ``model/`` as artifacts (TensorBoard: the plots as images).

MLflow: by default one SQLite store per output root (``runs/mlflow.db``, artifacts in ``runs/mlartifacts/``),
shared by every run under that root so they can be compared in ``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db``; ``tracking.uri`` points at a real server instead. The run id goes into ``run.yaml``
(``tracking.mlflow_run_id``), so ``--resume`` continues the same MLflow run, ``raeflow eval`` logs its figures to
it, and ``raeflow finetune`` opens a child run under it. TensorBoard: event files in ``RUN_DIR/tensorboard/``.
"""
from __future__ import annotations

import atexit
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import raeflow
from raeflow.config import RunConfig
from raeflow.errors import InputError

BACKENDS = ("mlflow", "tensorboard")
TB_DIR = "tensorboard"
Log = Callable[[str], None]


def check_backends(backends: Iterable[str]) -> list[str]:
    out = []
    for b in backends:
        if b not in BACKENDS:
            raise InputError(f"unknown tracker {b!r}; use one of {list(BACKENDS)}")
        if b not in out:
            out.append(b)
    return out


def default_mlflow_uri(run_path: Path) -> str:
    """One SQLite store for every run under the same output root (``runs/x`` and ``runs/y`` share runs/mlflow.db)."""
    return f"sqlite:///{(Path(run_path).resolve().parent / 'mlflow.db')}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of a metrics row: finite ints/floats, not flags (``best``), not the epoch itself."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "time")
            and math.isfinite(v)}


def git_commit() -> str | None:
    """The commit of the raeflow checkout running this, when it is one (an installed wheel has none)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(raeflow.__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_tags(cfg: RunConfig) -> dict[str, str]:
    tags = {"variant": cfg.variant, "dataset": str(cfg.data.dataset), "raeflow_version": raeflow.__version__}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # the key MLflow's UI shows as the run's source version
    return tags


class _MLflow:
    def __init__(self, cfg: RunConfig, run_path: Path, resume: bool, parent_run_id: str | None, log: Log):
        from mlflow import MlflowClient

        self.uri = cfg.tracking.uri or default_mlflow_uri(run_path)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            # A local store keeps artifacts beside itself (runs/mlartifacts), not in the caller's working directory.
            art = None if "://" in self.uri and not self.uri.startswith("sqlite:") else \
                (Path(self.uri.split("sqlite:///", 1)[-1]).parent / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=art)
        else:
            exp_id = exp.experiment_id
        if resume and cfg.tracking.mlflow_run_id:
            self.run_id = cfg.tracking.mlflow_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            log(f"mlflow: continuing run {self.run_id} in {self.uri}")
            return
        tags = run_tags(cfg)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # shown nested under the run it was fine-tuned from
        run = self.client.create_run(exp_id, run_name=Path(run_path).name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        # MLflow keeps params up to 6,000 characters; a longer value (a long list) is cut, not refused.
        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()
                  if not k.startswith("tracking.")]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        log(f"mlflow: run {self.run_id} in {self.uri} (see it with: mlflow ui --backend-store-uri {self.uri})")

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(1000 * row.get("time", time.time()))
        metrics = [Metric(k, v, ts, int(row["epoch"])) for k, v in numeric_metrics(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_values(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(1000 * time.time())
        metrics = [Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_dir(self, path: Path, name: str) -> None:
        if path.is_dir() and any(path.iterdir()):
            self.client.log_artifacts(self.run_id, str(path), name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _TensorBoard:
    def __init__(self, cfg: RunConfig, run_path: Path, log: Log):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_path) / TB_DIR
        self.writer = SummaryWriter(str(self.dir))
        # Markdown code block: TensorBoard's text tab renders the config as it reads in run.yaml.
        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
        self.writer.add_text("tags", "  \n".join(f"{k}: {v}" for k, v in run_tags(cfg).items()))
        log(f"tensorboard: event files in {self.dir} (see them with: tensorboard --logdir {self.dir})")

    def log_row(self, row: dict[str, Any]) -> None:
        self.log_values(numeric_metrics(row), int(row["epoch"]))

    def log_values(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_dir(self, path: Path, name: str) -> None:
        if name != "plots" or not path.is_dir():
            return  # TensorBoard shows images, not files: the model stays in model/
        import numpy as np
        from PIL import Image

        for png in sorted(path.glob("*.png")):
            img = np.asarray(Image.open(png).convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image(f"plots/{png.stem}", img, dataformats="HWC")
        self.writer.flush()

    def end(self, status: str) -> None:
        self.writer.close()


class Tracker:
    """The trackers a run logs to; with no backends every method does nothing (the default)."""

    def __init__(self, backends: list[Any]):
        self.backends = backends
        self.finished = False

    @property
    def mlflow_run_id(self) -> str | None:
        return next((b.run_id for b in self.backends if isinstance(b, _MLflow)), None)

    def log_row(self, row: dict[str, Any]) -> None:
        for b in self.backends:
            b.log_row(row)

    def log_values(self, values: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log_values(values, step)

    def finish(self, run_path: Path, status: str = "FINISHED") -> None:
        """Log ``plots/`` and ``model/`` (with its model card) as artifacts and close every tracker."""
        if self.finished:
            return
        self.finished = True
        for b in self.backends:
            if status == "FINISHED":
                b.log_dir(Path(run_path) / "plots", "plots")
                b.log_dir(Path(run_path) / "model", "model")
            b.end(status)


def start_tracking(cfg: RunConfig, run, *, resume: bool = False, parent_run_id: str | None = None,
                   log: Log = print) -> Tracker:
    """Open the trackers ``cfg.tracking.backends`` names for the run directory ``run`` (a RunDir); records the
    MLflow run id in ``run.yaml``; feeds every row ``run`` appends to ``metrics.jsonl`` to them."""
    names = check_backends(cfg.tracking.backends)
    backends: list[Any] = []
    if "mlflow" in names:
        backends.append(_MLflow(cfg, run.path, resume, parent_run_id, log))
    if "tensorboard" in names:
        backends.append(_TensorBoard(cfg, run.path, log))
    tracker = Tracker(backends)
    if not backends:
        return tracker
    if tracker.mlflow_run_id and cfg.tracking.mlflow_run_id != tracker.mlflow_run_id:
        cfg.tracking.mlflow_run_id = tracker.mlflow_run_id
        cfg.save(run.run_yaml)
    run.observers.append(tracker.log_row)
    # A run that dies before finish() is closed as FAILED when the process exits, not left "running" forever.
    atexit.register(lambda: tracker.finish(run.path, "FAILED"))
    return tracker


def log_to_run(run_dir: str | Path, values: dict[str, float], artifacts: dict[str, Path] | None = None,
               log: Log = print) -> bool:
    """Add figures computed after training (``raeflow eval``, a tuning sweep) to the run's trackers, at the last
    epoch's step; ``artifacts`` maps an artifact folder name to a local directory. False when it tracks nothing."""
    from raeflow.train.rundir import RunDir

    run = RunDir(run_dir)
    if not run.run_yaml.is_file():
        return False
    cfg = run.config()
    if not cfg.tracking.backends:
        return False
    step = max((int(r.get("epoch", 0)) for r in run.read_metrics()), default=0)
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    backends: list[Any] = []
    if "mlflow" in cfg.tracking.backends and cfg.tracking.mlflow_run_id:
        backends.append(_MLflow(cfg, run.path, True, None, lambda s: None))
    if "tensorboard" in cfg.tracking.backends:
        from torch.utils.tensorboard import SummaryWriter

        tb = _TensorBoard.__new__(_TensorBoard)
        tb.dir, tb.writer = run.path / TB_DIR, SummaryWriter(str(run.path / TB_DIR))
        backends.append(tb)
    for b in backends:
        b.log_values(values, step)
        for name, path in (artifacts or {}).items():
            if isinstance(b, _MLflow):
                b.log_dir(Path(path), name)
        b.end("FINISHED")
    log(f"logged {len(values)} figures to {', '.join(cfg.tracking.backends)}")
    return True


def eval_figures(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of ``raeflow eval``'s results as ``eval.<task>.<name>`` (per-row tables left out)."""
    out = {}
    for task, res in (results.get("tasks") or {}).items():
        if not isinstance(res, dict):
            continue
        for k, v in flatten(res).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"eval.{task}.{k}"] = float(v)
    return out
