"""Turning CLI flags into a :class:`~raeflow.config.RunConfig` (defaults < YAML < --set < flags)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from raeflow.config import RunConfig


def build_run_config(config: Path | None, sets: list[str], **flags: Any) -> RunConfig:
    cfg = RunConfig.from_yaml(config) if config else RunConfig()
    cfg = cfg.override(list(sets))
    # Only flags the user gave (not None / False) override the file.
    where = {"variant": ("variant",), "dataset": ("data", "dataset"), "workers": ("ray", "workers"),
             "gpu": ("ray", "gpu"), "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
             "lr": ("train", "lr"), "seed": ("train", "seed"), "output": ("output",),
             "storage_path": ("ray", "storage_path"), "address": ("ray", "address"),
             "latent_dim": ("model", "latent_dim"), "track": ("tracking", "backends"),
             "tracking_uri": ("tracking", "uri")}
    for name, value in flags.items():
        if value is None or value is False:
            continue
        path = where[name]
        node: Any = cfg
        for p in path[:-1]:
            node = getattr(node, p)
        if isinstance(node, dict):
            node[path[-1]] = value
        else:
            setattr(node, path[-1], value)
    return cfg.validate()  # every value checked before any work starts, whatever the engine
