"""The run directory: ``run.yaml``, ``metrics.jsonl``, ``model/``, ``plots/`` and the training checkpoints.

Checkpoints are ``torch.save`` files of plain tensors/dicts read back with ``weights_only=True`` (no arbitrary
unpickling); in-process runs keep them in ``checkpoints/``, Ray runs in ``ray/`` (Ray Train's own layout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raeflow.config import RunConfig
from raeflow.errors import MissingFileError, RunExistsError

_CKPT = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (a crash never leaves a half file that looks complete)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (_CKPT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / _CKPT)
    return d / _CKPT


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(directory) / _CKPT, map_location="cpu", weights_only=True)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # Called with every row appended to metrics.jsonl (experiment trackers, raeflow.tracking): both engines
        # write their rows here, in the driver process, so a tracker sees each epoch once (rank 0's, under Ray).
        self.observers: list = []

    # Layout, in one place.
    @property
    def run_yaml(self) -> Path:
        return self.path / "run.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def create(cls, cfg: RunConfig, resume: bool = False) -> "RunDir":
        """Make the run directory for ``cfg.output``; never silently overwrite an existing run."""
        run = cls(cfg.output)
        if resume:
            if not run.run_yaml.is_file():
                raise MissingFileError(f"--resume: {run.path} is not a run directory (no run.yaml)")
            return run
        if run.path.exists() and not run.path.is_dir():
            raise RunExistsError(f"--output {run.path} is a file; a run directory must be a folder")
        if run.path.exists() and any(run.path.iterdir()):
            if run.never_trained():
                # A run that failed before its first checkpoint (bad data, no Ray, Ctrl-C) holds only what
                # create() wrote: nothing to keep, and it must not block the same command run again.
                run.clear_failed_start()
            elif run.run_yaml.is_file() and not (run.model / "config.json").is_file():
                raise RunExistsError(f"run directory {run.path} holds an unfinished run (checkpoints, no model): pass "
                                     "--resume to continue it, or choose another --output")
            else:
                raise RunExistsError(f"run directory {run.path} already exists and is not empty: pass --resume to "
                                     "continue it, or choose another --output")
        run.path.mkdir(parents=True, exist_ok=True)
        run.plots.mkdir(exist_ok=True)
        cfg.save(run.run_yaml)
        return run

    #: What create() writes before any training: a run holding only these never trained.
    _START_FILES = {"run.yaml", "plots", "metrics.jsonl"}

    def never_trained(self) -> bool:
        """Only what :meth:`create` writes is here (plots/ empty, no metrics): the run failed before training."""
        names = {p.name for p in self.path.iterdir()}
        return (self.run_yaml.is_file() and names <= self._START_FILES
                and not (self.plots.is_dir() and any(self.plots.iterdir()))
                and not (self.metrics.is_file() and self.metrics.stat().st_size))

    def clear_failed_start(self) -> None:
        for name in self._START_FILES:
            p = self.path / name
            if p.is_dir():
                p.rmdir()
            elif p.exists():
                p.unlink()

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.run_yaml)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for observe in self.observers:
            observe(row)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def fill_in_row(self, row: dict[str, Any] | None) -> bool:
        """On resume, the resumed checkpoint's own row (it carries it): appended only when metrics.jsonl has no row
        of its epoch or a later one, as after a process killed between the checkpoint and its row. True if it was."""
        if not row or row["epoch"] <= max((r.get("epoch", 0) for r in self.read_metrics()), default=0):
            return False
        self.append_metrics(row)
        return True

    def truncate_metrics(self, upto_epoch: int) -> None:
        """On resume, drop rows of epochs after the checkpoint (they will be trained again)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= upto_epoch]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics)
