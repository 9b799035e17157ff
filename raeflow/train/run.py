"""``raeflow train``: load data, build the model, run an engine (Ray Train or in-process), save and plot.

Linear on purpose: everything a run does is readable top to bottom in :func:`train`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from raeflow.config import RunConfig, continue_config
from raeflow.data import SparseRows, TrainingData, load_training_data
from raeflow.data.stream import StreamedData, choose_read, in_memory_bytes
from raeflow.io import build_checked, save_model
from raeflow.models.base import TrainPlan
from raeflow.train.loop import (EpochResult, TensorBatches, Trainer, seed_everything, selection_key,
                                 selection_value)
from raeflow.train.report import epoch_line, metrics_row, omp_threads, threads_per_worker
from raeflow.train.rundir import RunDir, load_checkpoint, save_checkpoint
from raeflow.errors import InputError


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_epoch: int
    best: float
    selection_metric: str
    wall_s: float
    final_metrics: dict[str, float]


def default_output(variant: str) -> str:
    return str(Path("runs") / f"{variant}-{time.strftime('%Y%m%d-%H%M%S')}")


def model_config(cfg: RunConfig, data: TrainingData) -> dict[str, Any]:
    """The variant's constructor arguments: the user's ``model:`` section plus what the data decides."""
    mc = dict(cfg.model)
    mc["input_shape"] = list(data.train.shape)
    if data.train.classes and "num_classes" in _init_params(cfg.variant):
        mc.setdefault("num_classes", len(data.train.classes))
    return mc


def untrained_model(cfg: RunConfig) -> tuple[torch.nn.Module, TrainingData]:
    """The model ``cfg`` describes, untrained, built as training built it, and the in-memory data that sized it:
    what a run's checkpoints load into (``cfg`` a run's run.yaml)."""
    from raeflow.registry import build_model

    data = in_memory_data(cfg)
    return build_model(cfg.variant, **model_config(cfg, data)), data


def in_memory_data(cfg: RunConfig) -> TrainingData:
    """``cfg``'s training data read into memory, split and vectorised as its run reads it."""
    return load_training_data(cfg.data.dataset, cfg.data.val_size, vocab_size=cfg.data.vocab_size,
                              weighting=cfg.data.weighting)


def _init_params(variant: str) -> set[str]:
    import inspect

    from raeflow.registry import get_variant

    return set(inspect.signature(get_variant(variant).cls.__init__).parameters)


def read_training_data(cfg: RunConfig, local: bool, log: Callable[[str], None]) -> "TrainingData | StreamedData":
    """The run's data, read into memory or streamed (``data.read``: auto decides by size, and says why)."""
    how, why = choose_read(cfg.data.read, cfg.data.dataset)
    if how == "stream":
        if local:
            raise InputError(f"data: {cfg.data.dataset} is to be streamed ({why}) and streaming runs on Ray: drop "
                             "--local, or force data.read=memory")
        from raeflow.data.stream import open_streamed
        from raeflow.train.ray_engine import preflight

        preflight(cfg, log)  # the documents' vocabulary is counted in Ray tasks
        log(f"data: streamed by Ray Data ({why}); shuffled each epoch: file / row-group order, then a "
            f"{cfg.data.shuffle_buffer}-batch buffer per worker, seeded by train.seed")
        data = open_streamed(cfg.data.dataset, cfg.data.val_size, vocab_size=cfg.data.vocab_size,
                             weighting=cfg.data.weighting, log=log)
        data.plot_sample = data.sample()  # now, while Ray is up (the fit shuts down the Ray it started)
        return data
    if why not in ("built-in dataset", "not found"):
        log(f"data: read into memory ({why})")
    return in_memory_data(cfg)


def rows_of(x: Any) -> Any:
    """What :class:`TensorBatches` indexes: a tensor over the array, or sparse rows as they are (dense per batch)."""
    return x if isinstance(x, SparseRows) else torch.from_numpy(x)


def fit_local(cfg: RunConfig, model, data: TrainingData, run: RunDir, resume: bool,
              log: Callable[[str], None] = print,
              on_epoch: Callable[[EpochResult], None] | None = None) -> dict[str, torch.Tensor]:
    """Train in this process (no Ray); returns the selected (best) model state."""
    torch.set_num_threads(threads_per_worker(1, cfg.train.threads or omp_threads()))
    seed_everything(cfg.train.seed)
    trainer = Trainer(model, cfg.train, log=log)
    if resume and (run.checkpoints / "latest" / "checkpoint.pt").is_file():
        state = load_checkpoint(run.checkpoints / "latest")
        trainer.load_state_dict(state)
        run.truncate_metrics(trainer.progress.epoch)
        run.fill_in_row(state.get("row"))  # killed between the checkpoint and its metrics row
        log(f"resumed {run.path} at epoch {trainer.progress.epoch}")
    x = rows_of(data.train.x)
    y = None if data.train.y is None else torch.from_numpy(data.train.y)
    bs = min(cfg.train.batch_size, len(x))
    # A closed-form fit (PCA) must see every row; gradient stages drop the ragged last batch as usual.
    closed_form = any(st.closed_form for st in trainer.stages)
    batches = TensorBatches(x, y, bs, seed=cfg.train.seed, drop_last=not closed_form)
    val_batches = None
    if data.val is not None:
        vx = rows_of(data.val.x)
        vy = None if data.val.y is None else torch.from_numpy(data.val.y)
        val = TensorBatches(vx, vy, max(bs, 512), shuffle=False, drop_last=False)
        val_batches = lambda: val  # noqa: E731

    def train_batches(epoch: int):
        batches.set_epoch(epoch)
        # A per-batch bar on a terminal (long MNIST epochs); the per-epoch line and metrics.jsonl remain the record.
        return tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not sys.stderr.isatty())

    def on_epoch_end(r: EpochResult) -> None:
        # Checkpoint first: a metrics row is only written for an epoch a resume would not train again.
        row = metrics_row(r)
        state = {**trainer.state_dict(), "row": row}  # the row: a resume fills it in if it is missing
        if r.epoch % cfg.train.checkpoint_every == 0 or r.final:
            save_checkpoint(state, run.checkpoints / f"epoch-{r.epoch:04d}")
            save_checkpoint(state, run.checkpoints / "latest")
            old = sorted(run.checkpoints.glob("epoch-*"))[:-cfg.train.keep_checkpoints or None]
            for d in old:
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        if r.is_best:
            save_checkpoint({"model": state["model"], "epoch": r.epoch}, run.checkpoints / "best")
        run.append_metrics(row)
        log(epoch_line(r, trainer.total_epochs))
        if on_epoch is not None:
            on_epoch(r)

    trainer.fit(train_batches, val_batches, len(batches), on_epoch_end)
    best = run.checkpoints / "best"
    if (best / "checkpoint.pt").is_file():
        return load_checkpoint(best)["model"]
    return trainer.model.state_dict()


def train(cfg: RunConfig, *, resume: bool = False, local: bool = False,
          log: Callable[[str], None] = print, model: torch.nn.Module | None = None,
          data: TrainingData | None = None, parent_run_id: str | None = None,
          on_epoch: Callable[[EpochResult], None] | None = None,
          given: frozenset[str] | None = None, recipe: frozenset[str] = frozenset()) -> TrainResult:
    """Train ``cfg.variant`` on ``cfg.data`` and write the run directory.

    ``resume`` continues the run in ``cfg.output`` with its own run.yaml; ``given`` names the keys of ``cfg`` the
    caller set (dotted, as the CLI's flags and ``--set``): epoch counts among them extend the run, any other
    that differs from run.yaml is an error; ``recipe`` names those that came from a config file, which are only
    checked (:func:`raeflow.config.continue_config`).

    ``model`` starts from a prebuilt model instead of building one from ``cfg`` (``raeflow.finetune`` passes a
    classifier initialised from a trained encoder; ``cfg.variant`` / ``cfg.model`` are set from it, so run.yaml
    describes what is trained); ``data`` is data already prepared (there: with the encoder's vectoriser);
    ``parent_run_id`` nests this run's MLflow run under another (finetune: under the encoder's run).
    """
    t0 = time.perf_counter()
    if on_epoch is not None and not local:
        raise ValueError("on_epoch is only called by in-process (local) training")
    if resume:
        if not cfg.output:
            raise InputError("--resume needs --output: the run directory to continue")
        saved = RunDir(cfg.output).config()
        saved.ray = cfg.ray  # resources may change on resume; what is trained may not
        saved.output = cfg.output  # the directory may have moved (copied to another disk or machine) since it began
        cfg, extended = continue_config(saved, cfg, given or frozenset(), recipe)
        if extended:  # recorded, so the model card and a later --resume see the plan this run now follows
            log("resume with " + "; ".join(extended))
            cfg.save(RunDir(cfg.output).run_yaml)
    cfg.output = cfg.output or default_output(cfg.variant)
    cfg.validate()  # library callers too: nothing is loaded or started on a value out of range
    if data is None:
        data = read_training_data(cfg, local, log)
    if model is None:
        seed_everything(cfg.train.seed)  # the initial weights too follow train.seed (not only the batches)
        model = build_checked(cfg.variant, model_config(cfg, data))  # a bad or oversized config fails before any directory
    else:
        cfg.variant, cfg.model = model.variant, dict(model.config)
    if data.train.y is None and any(s.supervised for s in model.stages(TrainPlan(cfg.train.epochs,
                                                                                 dict(cfg.train.stage_epochs)))):
        raise InputError(f"{cfg.variant} trains on labels, and {cfg.data.dataset} has none")
    if not local:  # join/start Ray and check resources (--gpu without a GPU) before the run directory exists
        from raeflow.train.ray_engine import preflight

        preflight(cfg, log, data_bytes=in_memory_bytes(data))
    run = RunDir.create(cfg, resume=resume)
    from raeflow.tracking import start_tracking  # MLflow / TensorBoard when cfg.tracking.backends names them

    tracker = start_tracking(cfg, run, resume=resume, parent_run_id=parent_run_id, log=log)
    log(f"{cfg.variant}: {sum(p.numel() for p in model.parameters()):,} parameters; data {data.train.name} "
        f"train {len(data.train):,} val {0 if data.val is None else len(data.val):,} shape {data.train.shape}")
    if local:
        best_state = fit_local(cfg, model, data, run, resume, log, on_epoch)
    else:
        from raeflow.train.ray_engine import fit_ray  # Ray is imported only on this path

        best_state = fit_ray(cfg, model, data, run, resume, log)
    model.load_state_dict(best_state)
    model.eval()
    vec = data.vectoriser.to_json() if data.vectoriser is not None else None
    save_model(model, run.model, data=data.train.meta(), vectoriser=vec)
    rows = run.read_metrics()
    from raeflow.plots import plot_run

    if isinstance(data, StreamedData):  # plots draw a few thousand rows: those read at the start, not the corpus
        sample = data.plot_sample
        plot_run(run, model, TrainingData(sample, sample, data.vectoriser), log=log)
    else:
        plot_run(run, model, data, log=log)
    from raeflow.modelcard import write_model_card

    write_model_card(run.path)
    tracker.finish(run.path)
    sel = model.selection_metric
    best_row = next((r for r in reversed(rows) if r.get("best")), {})  # the trainer flags the selected epoch
    result = TrainResult(run.path, len(rows), best_row.get("epoch", -1),
                         selection_value(best_row, sel), sel,
                         time.perf_counter() - t0, rows[-1] if rows else {})
    log(summary_table(result, rows))
    return result


def summary_table(result: TrainResult, rows: list[dict[str, Any]]) -> str:
    """Per-epoch train/val loss and the selection metric (multi-phase variants such as AAE have no single
    ``loss``: their phases' terms are prefixed, so the selection metric is the column that means something)."""
    sel = result.selection_metric
    cols = ["train_loss", "val_loss"] + ([sel] if sel not in ("train_loss", "val_loss") else [])
    lines = ["", f"{'epoch':>5} {'stage':<12} " + " ".join(f"{c:>15}" for c in cols) + f" {'samples/s':>10}"]
    for r in rows:
        vals = " ".join(f"{r.get(c, math.nan):>15.4f}" for c in cols)
        lines.append(f"{r['epoch']:>5} {r['stage']:<12} {vals} {r.get('samples_per_s', 0):>10.0f}"
                     + ("  *" if r.get("best") else ""))
    # Without a validation split the trainer selects by the metric's training twin: say so, rather than print a
    # training loss under the validation metric's name.
    key = selection_key(rows[-1] if rows else {}, sel)
    by = sel if key == sel else f"{key} (no validation split)"
    chosen = (f"selected epoch {result.best_epoch} by {by} = {result.best:.4f}" if math.isfinite(result.best)
              else f"kept the last epoch ({result.best_epoch}; no validation split to select by)")
    lines += ["", f"{chosen}; wall {result.wall_s:.1f}s",
              f"run directory: {result.run_dir}  (model/, metrics.jsonl, plots/, run.yaml)"]
    return "\n".join(lines)
