"""The run configuration: one dataclass tree that a YAML file, CLI flags and ``--set a.b=c`` all write into.

Precedence, lowest first: dataclass defaults < ``--config FILE.yaml`` < ``--set`` overrides < explicit flags.
The resolved tree is saved as the run directory's ``run.yaml``, so a run can be repeated from that file alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    dataset: str = "mnist"  # built-in name (`raeflow datasets`), `name:split`, or a path to user data
    val_size: float | int | None = None  # rows carved from the end of train; None: 5,000 (10% of small sets)
    vocab_size: int = 2000  # documents: most frequent word stems kept (Hinton & Salakhutdinov used 2,000)
    weighting: str = "log"  # documents: counts | log | tfidf | prob


@dataclass
class TrainConfig:
    epochs: int = 10  # single-stage variants; multi-stage ones read stage_epochs first
    stage_epochs: dict[str, int] = field(default_factory=dict)  # e.g. {pretrain: 5, finetune: 30} for sdae
    batch_size: int = 128  # per step across all workers: each of N workers takes batch_size / N
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    weight_decay: float = 0.0
    schedule: str = "none"  # none | cosine | onecycle | step  (per stage, stepped every batch)
    step_epochs: int = 10  # `step` schedule: multiply the lr by step_gamma every step_epochs epochs
    step_gamma: float = 0.1
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    early_stopping: int | None = None  # stop the final stage after this many epochs without improvement
    seed: int = 0
    threads: int | None = None  # torch threads per worker; None: cores / workers (at least 1)
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 2  # the latest K are kept, plus the best by the variant's selection metric


@dataclass
class RayConfig:
    workers: int = 1  # data-parallel workers (fractional CPUs when there are fewer cores than workers)
    gpu: bool = False  # one GPU per worker; fails at once when the cluster has none
    address: str | None = None  # an existing cluster ("auto" or ray://...); None: start a local Ray
    storage_path: str | None = None  # shared storage URI for checkpoints on a multi-node cluster
    max_failures: int = 1  # worker failures survived (restart from the latest checkpoint)
    #: Ray placement group strategy for the worker group: PACK (Ray's default: fewest nodes, cheapest all-reduce)
    #: or SPREAD (one worker per node while nodes have room: every worker gets a whole node's cores, and a group
    #: restarted after losing a node packs onto the nodes left). STRICT_* would make a lost node fatal.
    placement: str = "PACK"
    amp: bool = False  # GPU only: bfloat16 autocast
    compile: bool = False  # GPU only: torch.compile the model


@dataclass
class TrackingConfig:
    # Where a run is also logged besides metrics.jsonl: the trackers people compare runs in (pythae logs to
    # W&B/MLflow/Comet, Lightning to TensorBoard). Empty: metrics.jsonl and plots/ only.
    backends: list[str] = field(default_factory=list)  # mlflow | tensorboard
    # MLflow tracking URI; None: one SQLite store beside the run directory (<output root>/mlflow.db), shared by
    # every run under that root so they can be compared (MLflow 3's default backend; the file store is legacy).
    uri: str | None = None
    experiment: str = "raeflow"  # MLflow experiment name
    # Filled in by `train`: the MLflow run this run directory logs to, so finetune / eval continue the same run.
    mlflow_run_id: str | None = None


@dataclass
class PlotConfig:
    # 2-D views of the codes drawn after training: "pca" (fast, linear, deterministic) and/or "tsne" (PCA to 50
    # dimensions, then t-SNE: shows clusters PCA folds together; seeded, so deterministic too).
    projections: list[str] = field(default_factory=lambda: ["pca"])
    scatter_n: int = 2000  # examples drawn in each scatter (t-SNE costs grow with it)


@dataclass
class RunConfig:
    variant: str = "ae"
    model: dict[str, Any] = field(default_factory=dict)  # the variant's constructor arguments (its config.json)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plots: PlotConfig = field(default_factory=PlotConfig)
    output: str | None = None  # run directory; None: runs/<variant>-<timestamp>

    # ------------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; top-level keys are "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            cur = getattr(out, f.name)
            if dataclasses.is_dataclass(cur):
                setattr(out, f.name, _fill(type(cur), d[f.name] or {}, f.name))
            else:
                setattr(out, f.name, d[f.name])
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        return cls.from_dict(yaml.safe_load(p.read_text()) or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML: ``3``, ``1e-3``, ``[1000, 500]``)."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set takes key=value, got {a!r}")
            key, raw = a.split("=", 1)
            value = _number(yaml.safe_load(raw))
            node = d
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    if p in node and node[p] is not None:
                        raise ValueError(f"--set {key}: {p!r} is not a section")
                    node[p] = {}
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(d)


def _fill(cls, d: dict[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys in '{section}': {sorted(unknown)}; it accepts {sorted(names)}")
    return cls(**{k: _number(v) for k, v in d.items()})


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; every such value here is meant as a number."""
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    return v
