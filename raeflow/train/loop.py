"""One trainer for every variant, plain PyTorch (no Ray): stages, phases, optimisers, schedules, checkpoints.

The same :class:`Trainer` runs in-process (``raeflow train --local``, the benchmark baseline) and inside each
Ray Train worker; the engine only supplies how the model is wrapped (DDP), how metrics and PCA's moments are
summed across workers, and what happens at the end of each epoch (write metrics, save or report a checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from raeflow.config import TrainConfig
from raeflow.models.base import Autoencoder, Phase, Stage, TrainPlan, parameters_of
from raeflow.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (x (B, *input_shape), y (B,) or None)


def window_shuffled(windows: Iterable[Batch], batch_size: int, *, seed: int | None, drop_last: bool) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows from a stream of larger windows, each window's rows in a seeded random order
    (none with ``seed=None``); rows left over from one window lead the next, so every batch but the last is full.

    A streamed shard's shuffle, done in the worker: one permutation per window of a few thousand rows. Ray Data's
    ``local_shuffle_buffer_size`` does the same job per batch, and cost 10-15% of a streamed epoch here (a dense AE
    on 2 cores: 1,581-1,715 samples/s with it, 1,897 without).
    """
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    carry: Batch | None = None
    for x, y in windows:
        if gen is not None:
            order = torch.randperm(len(x), generator=gen)
            x, y = x[order], (None if y is None else y[order])
        if carry is not None:
            x = torch.cat([carry[0], x])
            y = None if y is None else torch.cat([carry[1], y])
        full = len(x) // batch_size * batch_size
        for a in range(0, full, batch_size):
            yield x[a:a + batch_size], (None if y is None else y[a:a + batch_size])
        carry = (x[full:], None if y is None else y[full:]) if full < len(x) else None
    if carry is not None and not drop_last:
        yield carry


class TensorBatches:
    """Shuffled mini-batches of in-memory tensors, this worker's ``1/world`` share of each epoch.

    Every worker draws the same permutation (seeded by ``seed + epoch``) and takes its strided slice, so shards
    are disjoint and equally sized (the tail that does not divide evenly is dropped for training, as
    DistributedSampler does, so all workers take the same number of steps and DDP never waits forever).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world: int = 1, drop_last: bool = True):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        per = n // self.world if self.drop_last else math.ceil(n / self.world)
        return idx[self.rank:: self.world][:per]

    def __len__(self) -> int:
        per = len(self._indices())
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        idx = self._indices()
        for i in range(len(self)):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[j], (None if self.y is None else self.y[j])


def selection_key(metrics: dict[str, Any], name: str) -> str:
    """The metric an epoch is selected by: ``name``, or without a validation split its training twin
    (``val_loss`` -> ``train_loss``)."""
    return name if name in metrics else name.replace("val_", "train_")


def selection_value(metrics: dict[str, Any], name: str) -> float:
    """The value of :func:`selection_key` in one epoch's metrics; NaN when it is absent."""
    return float(metrics.get(selection_key(metrics, name), math.nan))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adam, adamw or sgd")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, steps_per_epoch: int):
    """A per-step schedule over one stage (each stage restarts its schedule, as its optimisers do)."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.step_epochs * steps_per_epoch),
                                               gamma=cfg.step_gamma)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use none, cosine, onecycle or step")


@dataclass
class Progress:
    """Where training stands; everything in it goes into a checkpoint."""

    stage: int = 0  # index into model.stages(plan)
    epoch_in_stage: int = 0  # epochs completed in that stage
    epoch: int = 0  # epochs completed overall
    best: float = math.inf  # best selection metric in the final stage
    best_epoch: int = -1
    stale: int = 0  # epochs since `best` improved (early stopping)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EpochResult:
    epoch: int  # 1-based, over the whole run
    stage: str
    metrics: dict[str, float]  # train_* and val_* terms, samples_per_s, epoch_s, lr
    is_best: bool
    final: bool  # the run ends after this epoch
    selection_metric: str
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``model.stages(plan)``: for each batch, each phase does zero_grad / forward / backward / step.

    ``wrap(model) -> module`` returns what ``forward`` is called on (DDP in Ray workers; the model itself
    in-process). ``all_reduce_sum(t)`` sums a tensor across workers in place (identity in-process).
    """

    def __init__(self, model: Autoencoder, cfg: TrainConfig, *, device: torch.device | str = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 all_reduce_sum: Callable[[torch.Tensor], None] | None = None,
                 amp: bool = False, log: Callable[[str], None] = print):
        self.model = model.to(device)
        self.cfg = cfg
        self.device = torch.device(device)
        self.wrap_fn = wrap or (lambda m: m)
        self.all_reduce_sum = all_reduce_sum
        self.amp = amp and self.device.type == "cuda"
        self.log = log
        self.plan = TrainPlan(cfg.epochs, dict(cfg.stage_epochs))
        self.stages: list[Stage] = model.stages(self.plan)
        empty = [s.name for s in self.stages if s.epochs < 1]
        if empty:  # fit() would never leave a stage of 0 epochs: refuse instead of hanging
            raise ConfigError(f"{model.variant}: stage(s) {empty} have no epochs; give each stage at least 1")
        self.progress = Progress()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self._restored: dict[str, Any] | None = None
        self.wrapped: nn.Module = self.model

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: model, every phase's optimiser and schedule, progress, RNG state.
        Only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it."""
        return {"model": self.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if s is not None},
                "progress": self.progress.to_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.progress = Progress(**state["progress"])
        # Where we are in the stage plan follows from the epochs done, so a resumed run whose plan was extended
        # (more epochs in run.yaml) continues instead of seeing its last stage as finished.
        done = self.progress.epoch
        for i, st in enumerate(self.stages):
            if done < st.epochs:
                self.progress.stage, self.progress.epoch_in_stage = i, done
                break
            done -= st.epochs
        else:
            self.progress.stage, self.progress.epoch_in_stage = len(self.stages), 0
        set_rng_state(state["rng"])
        self._restored = state  # optimisers are rebuilt per stage; they pick their state up then

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    # ------------------------------------------------------------------------------------- training
    def _enter_stage(self, stage: Stage, steps_per_epoch: int) -> None:
        frozen = {id(p) for n in stage.frozen for p in self.model.get_submodule(n).parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        self.model.enter_stage(stage, fresh=self.progress.epoch_in_stage == 0)
        self.optimizers, self.schedulers = {}, {}
        if stage.closed_form:
            self.wrapped = self.model
            return
        # Re-wrap per stage: DDP records which parameters need gradients when it is constructed.
        self.wrapped = self.wrap_fn(self.model)
        for ph in stage.phases:
            params = list(parameters_of(self.model, ph.modules))
            if not params:
                raise ConfigError(f"{self.model.variant}: phase {ph.name!r} of stage {stage.name!r} has no "
                                 "trainable parameters")
            key = f"{stage.name}/{ph.name}"
            if ph.optim is None:
                opt = make_optimizer(params, self.cfg, self.cfg.lr * ph.lr_scale)
                sched = make_scheduler(opt, self.cfg, stage.epochs, steps_per_epoch)
            else:  # the model's recipe fixes this phase's optimiser
                o = ph.optim
                cfg = dataclasses.replace(self.cfg, optimizer=o.kind, weight_decay=o.weight_decay, schedule=o.schedule)
                opt = make_optimizer(params, cfg, o.lr, momentum=o.momentum_at(self.progress.epoch_in_stage))
                sched = make_scheduler(opt, cfg, stage.epochs, steps_per_epoch)
            if self._restored is not None and key in self._restored["optimizers"]:
                opt.load_state_dict(self._restored["optimizers"][key])
                if sched is not None and key in self._restored["schedulers"]:
                    sched.load_state_dict(self._restored["schedulers"][key])
            self.optimizers[key], self.schedulers[key] = opt, sched

    def _set_momentum(self, stage: Stage) -> None:
        """Phases whose declared optimiser has a momentum schedule get this epoch's momentum (SGD only)."""
        for ph in stage.phases:
            if ph.optim is not None and ph.optim.kind == "sgd" and not stage.closed_form:
                for g in self.optimizers[f"{stage.name}/{ph.name}"].param_groups:
                    g["momentum"] = ph.optim.momentum_at(self.progress.epoch_in_stage)

    def _step(self, stage: Stage, ph: Phase, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        key = f"{stage.name}/{ph.name}"
        opt = self.optimizers[key]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            terms = self.wrapped(x, y, stage=stage.name, phase=ph.name)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.model.variant}: non-finite loss in stage {stage.name!r} phase "
                                     f"{ph.name!r} at epoch {self.progress.epoch + 1}; lower the learning rate")
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        opt.step()
        if self.schedulers[key] is not None:
            self.schedulers[key].step()
        prefix = "" if len(stage.phases) == 1 else f"{ph.name}_"
        return {prefix + k: float(v.detach()) for k, v in terms.items()}

    def _reduce_means(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Mean of per-batch terms over all workers (each weighted by its batch count)."""
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
        if self.all_reduce_sum is not None:
            self.all_reduce_sum(t)
        n = max(t[-1].item(), 1.0)
        return {k: t[i].item() / n for i, k in enumerate(keys)}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], stage: Stage) -> dict[str, float]:
        """Mean loss terms on held-out batches, model in eval mode (no corruption, posterior means)."""
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0.0
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = None if y is None else y.to(self.device, non_blocking=True)
            for ph in stage.phases or [Phase("main")]:
                terms = self.model(x, y, stage=stage.name, phase=ph.name)
                prefix = "" if len(stage.phases) <= 1 else f"{ph.name}_"
                for k, v in terms.items():
                    sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v) * len(x)
            count += len(x)
        return self._reduce_means(sums, count)

    def fit(self, train_batches: Callable[[int], Iterable[Batch]], val_batches: Callable[[], Iterable[Batch]] | None,
            steps_per_epoch: int, on_epoch_end: Callable[[EpochResult], None] | None = None) -> Progress:
        """Train from ``self.progress`` to the end. ``train_batches(epoch)`` yields this worker's batches."""
        p = self.progress
        while p.stage < len(self.stages) and not p.stopped_early:
            stage = self.stages[p.stage]
            final_stage = p.stage == len(self.stages) - 1
            self._enter_stage(stage, steps_per_epoch)
            while p.epoch_in_stage < stage.epochs:
                t0 = time.perf_counter()
                self._set_momentum(stage)
                self.model.train()
                sums: dict[str, float] = {}
                seen = 0
                for x, y in train_batches(p.epoch):
                    x = x.to(self.device, non_blocking=True)
                    y = None if y is None else y.to(self.device, non_blocking=True)
                    if stage.supervised and y is None:
                        raise ConfigError(f"stage {stage.name!r} of {self.model.variant} needs labelled data")
                    if stage.closed_form:
                        self.model.accumulate(x)
                        terms = {}
                    else:
                        terms = {}
                        for ph in stage.phases:
                            terms.update(self._step(stage, ph, x, y))
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v * len(x)
                    seen += len(x)
                if stage.closed_form:
                    self.model.finalize(self.all_reduce_sum)
                elapsed = time.perf_counter() - t0
                metrics = {f"train_{k}": v for k, v in self._reduce_means(sums, seen).items()}
                n = torch.tensor([float(seen)], dtype=torch.float64)
                if self.all_reduce_sum is not None:
                    self.all_reduce_sum(n)  # summed over workers (_reduce_means would average them)
                samples = n.item()
                if val_batches is not None:
                    metrics.update({f"val_{k}": v for k, v in self.evaluate(val_batches(), stage).items()})
                metrics["samples_per_s"] = samples / max(elapsed, 1e-9)
                metrics["epoch_s"] = elapsed
                if self.optimizers:
                    metrics["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
                p.epoch_in_stage += 1
                p.epoch += 1
                sel = self.model.selection_metric
                is_best = False
                if final_stage:
                    value = selection_value(metrics, sel)
                    # No metric to select by (PCA fitted without a validation split): the latest epoch is best.
                    if value < p.best or math.isnan(value):
                        p.best, p.best_epoch, p.stale, is_best = value, p.epoch, 0, True
                    else:
                        p.stale += 1
                    if self.cfg.early_stopping and p.stale >= self.cfg.early_stopping:
                        p.stopped_early = True
                last = p.stopped_early or (final_stage and p.epoch_in_stage >= stage.epochs)
                if p.epoch_in_stage >= stage.epochs:
                    p.stage += 1
                    p.epoch_in_stage = 0
                if on_epoch_end is not None:
                    on_epoch_end(EpochResult(p.epoch, stage.name, metrics, is_best, last, sel))
                if p.stopped_early:
                    self.log(f"early stopping: no improvement of {sel} for {self.cfg.early_stopping} epochs")
                    break
                if p.stage != self.stages.index(stage):
                    break
        return p
