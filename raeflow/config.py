"""The run configuration: one dataclass tree that a YAML file, CLI flags and ``--set a.b=c`` all write into.

Precedence, lowest first: dataclass defaults < ``--config FILE.yaml`` < ``--set`` overrides < explicit flags.
The resolved tree is saved as the run directory's ``run.yaml``, so a run can be repeated from that file alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from raeflow.errors import ConfigError, MissingFileError


@dataclass
class DataConfig:
    dataset: str = "mnist"  # built-in name (`raeflow datasets`), `name:split`, or a path to user data
    # validation rows: built-ins the last ones of train, user corpora by a hash of each id; None: 5,000 (10% of small sets)
    val_size: float | int | None = None
    vocab_size: int = 2000  # documents: most frequent word stems kept (Hinton & Salakhutdinov used 2,000)
    weighting: str = "log"  # documents: counts | log | tfidf | prob | raw (counts, for Poisson RBMs)
    # auto | memory | stream. A user corpus larger than half the data budget is streamed by Ray Data tasks (the
    # driver never holds it); smaller ones are read once into memory, which is faster. Built-ins: memory.
    read: str = "auto"
    # Streamed training's shuffle, seeded by train.seed: the files / row groups are read in a new order each epoch,
    # and each worker permutes windows of this many batches (rows of a block arrive together otherwise). Dense rows
    # only; documents use Ray Data's local shuffle buffer of the same size.
    shuffle_buffer: int = 20


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
    # torch threads per worker; None: OMP_NUM_THREADS in a local run where set, else cores / workers (at least 1)
    threads: int | None = None
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 2  # the latest K are kept, plus the best by the variant's selection metric


@dataclass
class RayConfig:
    workers: int = 1  # data-parallel workers (fractional CPUs when there are fewer cores than workers)
    gpu: bool = False  # one GPU per worker; fails at once when the cluster has none
    address: str | None = None  # an existing cluster ("auto", host:port, RAY_ADDRESS); None: start a local Ray
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
            raise ConfigError(f"unknown config keys {sorted(unknown)}; top-level keys are "
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
            raise MissingFileError(f"config file not found: {p}")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size:,} bytes is not a run config (limit {MAX_CONFIG_BYTES:,})")
        d = load_yaml(p.read_text(), str(p)) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: a run config is a YAML mapping (variant:, model:, train:, ...), got "
                              f"{type(d).__name__}")
        return cls.from_dict(d)

    def validate(self) -> "RunConfig":
        """Check every value's type and range and the cross-field rules; ConfigError naming the first bad key.

        Called before any work starts (``raeflow train`` on every engine, ``finetune``, ``showcase``): a value out
        of range must not train by gradient ascent (``grad_clip<0``), be rounded silently (``epochs=1.5``,
        ``batch_size=0`` on Ray) or crash after hours of training (``latent_dim=0`` in the plots)."""
        for section, key, rule in _SCHEMA:
            node = self if section is None else getattr(self, section)
            name = key if section is None else f"{section}.{key}"
            _check(name, getattr(node, key), rule)
        for stage, n in self.train.stage_epochs.items():
            _check(f"train.stage_epochs.{stage}", n, _Int(0, MAX_EPOCHS))
        if not isinstance(self.model, dict):
            raise ConfigError(f"model: must be a mapping of the variant's arguments, got {self.model!r}")
        for key, value in self.model.items():
            _check_model_value(f"model.{key}", key, value)
        if self.train.batch_size < self.ray.workers:
            raise ConfigError(f"train.batch_size={self.train.batch_size} is split across ray.workers="
                              f"{self.ray.workers}: it must be at least the number of workers")
        if self.output is not None and Path(self.output).exists() and not Path(self.output).is_dir():
            raise ConfigError(f"output={self.output!r} is a file; the run directory must be a folder (or not exist)")
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML: ``3``, ``1e-3``, ``[1000, 500]``)."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set takes key=value, got {a!r}")
            key, raw = a.split("=", 1)
            value = _number(load_yaml(raw, f"--set {key}"))
            node = d
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    if p in node and node[p] is not None:
                        raise ConfigError(f"--set {key}: {p!r} is not a section")
                    node[p] = {}
                node = node[p]
            node[parts[-1]] = value
        return RunConfig.from_dict(d)


def _fill(cls, d: dict[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown keys in '{section}': {sorted(unknown)}; it accepts {sorted(names)}")
    return cls(**{k: _number(v) for k, v in d.items()})


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; every such value here is meant as a number."""
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    return v


# ------------------------------------------------------------------------------------------- validation
#: A run config is a few hundred bytes; a megabyte is a mistake (or an attack), not a config.
MAX_CONFIG_BYTES = 1 << 20
MAX_EPOCHS = 100_000
#: Any one layer width / code size: wider than anything an autoencoder here needs, small enough that a typo
#: (hidden=[300000, 300000], 360 GB of weights) is refused before a byte is allocated.
MAX_WIDTH = 65_536


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a config never needs them, and nested aliases ("billion laughs")
    make a 1 KB file expand into an object graph that every later copy walks exponentially."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in a config "
                              f"(line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` without aliases; a syntax error becomes a ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())[:300]})") from None


@dataclass(frozen=True)
class _Int:
    lo: int | None = None
    hi: int | None = None
    optional: bool = False

    def describe(self) -> str:
        rng = (f"an integer in [{self.lo}, {self.hi}]" if self.hi is not None else f"an integer >= {self.lo}")
        return rng + (" or null" if self.optional else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        return (isinstance(v, int) and not isinstance(v, bool) and (self.lo is None or v >= self.lo)
                and (self.hi is None or v <= self.hi))


@dataclass(frozen=True)
class _Float:
    lo: float | None = None  # exclusive when lo_open
    hi: float | None = None
    lo_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        lo = "" if self.lo is None else (f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}")
        hi = "" if self.hi is None else f"<= {self.hi:g}"
        return "a finite number " + " and ".join(x for x in (lo, hi) if x) + (" or null" if self.optional else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


@dataclass(frozen=True)
class _Choice:
    choices: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))

    def ok(self, v: Any) -> bool:
        return isinstance(v, type(self.choices[0])) and v in self.choices


@dataclass(frozen=True)
class _Str:
    optional: bool = False

    def describe(self) -> str:
        return "a non-empty string" + (" or null" if self.optional else "")

    def ok(self, v: Any) -> bool:
        return (v is None and self.optional) or (isinstance(v, str) and bool(v.strip()) and "\0" not in v)


@dataclass(frozen=True)
class _ValSize:
    def describe(self) -> str:
        return "null, a fraction in (0, 1) or a row count >= 0"

    def ok(self, v: Any) -> bool:
        return (v is None or _Int(0).ok(v)
                or (isinstance(v, float) and math.isfinite(v) and 0.0 < v < 1.0))


_BOOL = _Choice((False, True))

#: (section, key, rule): every field of the tree, with why its bounds are what they are where it is not obvious.
_SCHEMA = [
    (None, "variant", _Str()),
    (None, "output", _Str(optional=True)),
    ("data", "dataset", _Str()),
    ("data", "val_size", _ValSize()),
    ("data", "vocab_size", _Int(1, 1_000_000)),  # the model's input width: bounded like a layer
    ("data", "weighting", _Choice(("counts", "log", "tfidf", "prob", "raw"))),
    ("data", "read", _Choice(("auto", "memory", "stream"))),
    ("data", "shuffle_buffer", _Int(0, 10_000)),  # batches held by each worker: bounded memory
    ("train", "epochs", _Int(1, MAX_EPOCHS)),
    ("train", "batch_size", _Int(1, 1_000_000)),
    ("train", "lr", _Float(0.0, 10.0, lo_open=True)),  # 0 or negative would not train / ascend the loss
    ("train", "optimizer", _Choice(("adam", "adamw", "sgd"))),
    ("train", "weight_decay", _Float(0.0, 10.0)),
    ("train", "schedule", _Choice(("none", "cosine", "onecycle", "step"))),
    ("train", "step_epochs", _Int(1, MAX_EPOCHS)),
    ("train", "step_gamma", _Float(0.0, 1.0, lo_open=True)),
    ("train", "grad_clip", _Float(0.0, lo_open=True, optional=True)),  # a negative norm flips the gradient
    ("train", "early_stopping", _Int(1, MAX_EPOCHS, optional=True)),
    ("train", "seed", _Int(0, 2**32 - 1)),  # numpy's seed range
    ("train", "threads", _Int(1, 1024, optional=True)),
    ("train", "checkpoint_every", _Int(1, MAX_EPOCHS)),
    ("train", "keep_checkpoints", _Int(1, 1000)),
    ("ray", "workers", _Int(1, 1024)),
    ("ray", "gpu", _BOOL),
    ("ray", "address", _Str(optional=True)),
    ("ray", "storage_path", _Str(optional=True)),
    ("ray", "max_failures", _Int(0, 100)),
    ("ray", "amp", _BOOL),
    ("ray", "compile", _BOOL),
]


def _check(name: str, value: Any, rule: Any) -> None:
    if not rule.ok(value):
        raise ConfigError(f"{name}={value!r}: must be {rule.describe()}")


def _check_model_value(name: str, key: str, value: Any) -> None:
    """The model section belongs to each variant (its constructor checks the rest); sizes are bounded here for
    all of them, so no variant allocates a typo: ``*_dim``/``latent*`` are one size, ``hidden*``/``channels``
    a list of sizes."""
    size = _Int(1, MAX_WIDTH)
    if key.endswith("_dim") or key.startswith("latent") or key in ("num_classes",):
        _check(name, value, _Int(1, MAX_WIDTH, optional=True))
    elif key.startswith("hidden") or key in ("channels", "filters"):
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > 64:
            raise ConfigError(f"{name}: {len(values)} layers; at most 64")
        for i, v in enumerate(values):
            if not size.ok(v):
                raise ConfigError(f"{name}[{i}]={v!r}: must be {size.describe()}")


#: What ``--resume`` may change: where and how the run executes (resources, threads), and how long it trains.
#: Anything else would continue a different run from this one's checkpoint.
RESUME_MAY_CHANGE = ("output", "ray.", "tracking.", "train.threads", "train.epochs", "train.stage_epochs.")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; an empty mapping is a leaf of its own."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def continue_config(saved: RunConfig, given: RunConfig, keys: set[str] | frozenset[str],
                    recipe_keys: set[str] | frozenset[str] = frozenset()) -> tuple[RunConfig, list[str]]:
    """The config a resumed run continues with: the run's own ``saved`` one, changed where the caller set a key
    (``keys``, dotted, e.g. ``train.stage_epochs.prior``, ``model``: flags and ``--set``) that
    :data:`RESUME_MAY_CHANGE` allows. ``recipe_keys`` (those of a ``--config`` file) are only checked: the file is
    the recipe the run began with, so its epoch counts never undo an extension recorded in run.yaml, and any other
    value that differs means the recipe changed since. A key that differs and may not change is a ConfigError
    naming it, rather than ignored: a flag that silently does nothing reads as done. Returns the config and the
    changes made, as ``key: old -> new``."""
    old, new = flatten(saved.to_dict()), flatten(given.to_dict())

    def differing(ks) -> list[str]:
        touched = sorted({fk for fk in old.keys() | new.keys() for k in ks if fk == k or fk.startswith(k + ".")})
        return [fk for fk in touched if old.get(fk) != new.get(fk)]

    changed = differing(keys)
    refused = [fk for fk in sorted(set(changed) | set(differing(recipe_keys)))
               if not fk.startswith(RESUME_MAY_CHANGE)]
    if refused:
        raise ConfigError("--resume continues the run recorded in its run.yaml and cannot change "
                          + ", ".join(f"{k} ({old.get(k)!r} there, {new.get(k)!r} given)" for k in refused)
                          + "; it may change the epochs (--epochs, --set train.stage_epochs.STAGE=N) and resources")
    d = saved.to_dict()
    for fk in changed:
        node, parts = d, fk.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if fk in new:
            node[parts[-1]] = new[fk]
        else:
            node.pop(parts[-1], None)
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if k.startswith("train.")]
    return RunConfig.from_dict(d).validate(), changes
