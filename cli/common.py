"""Turning CLI flags into a :class:`~raeflow.config.RunConfig` (defaults < YAML < --set < flags)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from raeflow.config import RunConfig, flatten, load_yaml

#: Where each CLI flag lands in the run config.
FLAG_KEYS = {"variant": "variant", "dataset": "data.dataset", "workers": "ray.workers", "gpu": "ray.gpu",
             "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
             "output": "output", "storage_path": "ray.storage_path", "address": "ray.address",
             "latent_dim": "model.latent_dim", "track": "tracking.backends", "tracking_uri": "tracking.uri"}


def build_run_config(config: Path | None, sets: list[str], **flags: Any) -> RunConfig:
    cfg = RunConfig.from_yaml(config) if config else RunConfig()
    cfg = cfg.override(list(sets))
    # Only flags the user gave (not None / False) override the file.
    for name, value in flags.items():
        if value is None or value is False:
            continue
        path = FLAG_KEYS[name].split(".")
        node: Any = cfg
        for p in path[:-1]:
            node = getattr(node, p)
        if isinstance(node, dict):
            node[path[-1]] = value
        else:
            setattr(node, path[-1], value)
    return cfg.validate()  # every value checked before any work starts, whatever the engine


def given_keys(config: Path | None, sets: list[str], **flags: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The dotted keys the user set: (``--set``'s and the flags given, those of the YAML file). ``--resume``
    applies the first where they may change and checks the second against the run's own config: it refuses a
    change it cannot make rather than ignoring it."""
    recipe: frozenset[str] = frozenset()
    if config:
        raw = load_yaml(Path(config).read_text(), str(config))
        recipe = frozenset(flatten(raw if isinstance(raw, dict) else {}))
    keys = {a.split("=", 1)[0].strip() for a in sets}
    keys.update(FLAG_KEYS[n] for n, v in flags.items() if v is not None and v is not False)
    return frozenset(keys), recipe
