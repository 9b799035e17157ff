"""Saving and loading models: ``config.json`` + ``model.safetensors`` (+ the document vectoriser as JSON).

Nothing here unpickles: weights are safetensors, everything else JSON. ``config.json`` holds the variant, the
constructor arguments recorded by ``@register_model``, the data it was trained on (shape, preprocessing,
classes) and the raeflow version, so ``load_model`` can rebuild the exact module with no other input.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from raeflow.version import __version__
from raeflow.registry import build_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VECTORISER = "vectoriser.json"


def model_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory (holding ``model/``) or the model directory itself."""
    p = Path(path)
    if (p / CONFIG).is_file():
        return p
    if (p / "model" / CONFIG).is_file():
        return p / "model"
    if not p.exists():
        raise FileNotFoundError(f"no such model or run directory: {p}")
    raise FileNotFoundError(f"{p} holds no {CONFIG} (nor model/{CONFIG}): not a raeflow model or run directory")


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights); contiguous clones keep every key loadable.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, directory: str | os.PathLike, data: dict[str, Any] | None = None,
               vectoriser: dict | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``directory/{config.json, model.safetensors[, vectoriser.json]}`` atomically per file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    from raeflow.models.capabilities import capabilities_of

    # latent_dim / bounded / capabilities are derived facts, recorded so that readers of an embeddings directory
    # or a model card need not build the model; loading always rebuilds from "model" (the constructor args).
    cfg = {"variant": model.variant, "raeflow_version": __version__, "model": model.config,
           "data": data or {}, "latent_dim": int(getattr(model, "latent_dim", 0)) or None,
           "bounded": bool(getattr(model, "bounded", True)),
           "capabilities": sorted(capabilities_of(model)), **(extra or {})}
    tmp = d / (WEIGHTS + ".tmp")
    save_file(_state_for_saving(model), str(tmp), metadata={"variant": model.variant})
    os.replace(tmp, d / WEIGHTS)
    _write_json(d / CONFIG, cfg)
    if vectoriser is not None:
        _write_json(d / VECTORISER, vectoriser)
    return d


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((model_dir(path) / CONFIG).read_text())


def read_vectoriser(path: str | os.PathLike) -> dict | None:
    f = model_dir(path) / VECTORISER
    return json.loads(f.read_text()) if f.is_file() else None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.json`` and load its safetensors weights; returns it in eval mode."""
    d = model_dir(path)
    cfg = read_config(d)
    model = build_model(cfg["variant"], **cfg["model"])
    state = load_file(str(d / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d / WEIGHTS} does not match variant {cfg['variant']!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def model_sha256(path: str | os.PathLike) -> str:
    """Hash of config.json + weights: identifies exactly which model produced an embedding."""
    d = model_dir(path)
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(d / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
