"""Saving and loading models: ``config.json`` + ``model.safetensors`` (+ the document vectoriser as JSON).

Nothing here unpickles: weights are safetensors, everything else JSON. ``config.json`` holds the variant, the
constructor arguments recorded by ``@register_model``, the data it was trained on (shape, preprocessing,
classes) and the raeflow version, so ``load_model`` can rebuild the exact module with no other input.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from raeflow.version import __version__
from raeflow.registry import build_model
from raeflow.errors import ConfigError, InputError, MissingFileError, ModelFileError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VECTORISER = "vectoriser.json"


def special_file_kind(mode: int) -> str:
    """What a non-regular file is, for error messages: "a folder", "a FIFO", "a device" or "a special file"."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def model_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory (holding ``model/``) or the model directory itself."""
    p = Path(path)
    if (p / CONFIG).is_file():
        return p
    if (p / "model" / CONFIG).is_file():
        return p / "model"
    if not p.exists():
        raise MissingFileError(f"no such model or run directory: {p}")
    raise MissingFileError(f"{p} holds no {CONFIG} (nor model/{CONFIG}): not a raeflow model or run directory")


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


#: A model's config.json is a few KB; vectoriser.json holds a vocabulary (a few MB at most).
MAX_JSON_BYTES = 64 << 20
#: Weights raeflow will load or hash: far above any model here (MNIST AE-30: 12 MB), far below what a typo or a
#: symlink to /dev/zero would have us read.
MAX_WEIGHTS_BYTES = 8 << 30
#: Parameters a model may have (float32: 4 bytes each). Counted on the meta device, before any allocation.
MAX_PARAMETERS = 1_000_000_000


def regular_file(path: Path, limit: int, what: str) -> Path:
    """``path`` if it is a regular file (after symlinks) of at most ``limit`` bytes; an InputError otherwise.

    A FIFO, a device (``/dev/zero``) or a folder named like a data or weights file would hang or never end a read.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file ({what})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: {special_file_kind(st.st_mode)}, not a regular file ({what})")
    if st.st_size > limit:
        raise InputError(f"{path}: {st.st_size:,} bytes is over the {limit:,}-byte limit for {what}")
    return path


def _read_json(path: Path, what: str) -> Any:
    regular_file(path, MAX_JSON_BYTES, what)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    d = model_dir(path)
    cfg = _read_json(d / CONFIG, "a model config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("variant"), str) or not isinstance(cfg.get("model"), dict):
        raise ModelFileError(f"{d / CONFIG}: not a raeflow model config (needs \"variant\" and a \"model\" mapping)")
    return cfg


def build_checked(variant: str, config: dict[str, Any]) -> nn.Module:
    """``build_model`` with its size bounded before any memory is allocated: the model is first built on torch's
    meta device (shapes only), its parameters counted, and refused over :data:`MAX_PARAMETERS`."""
    if not isinstance(config, dict):
        raise ConfigError(f"a model config is a mapping of constructor arguments, got {config!r}")
    from raeflow.config import _check_model_value

    for key, value in config.items():
        _check_model_value(f"model.{key}", key, value)
    shape = config.get("input_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 3 and
                                  all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 65_536
                                      for s in shape)):
        raise ConfigError(f"model.input_shape={shape!r}: must be 1 to 3 sizes, each an integer in [1, 65536]")
    try:
        with torch.device("meta"):
            probe = build_model(variant, **config)
        n = sum(p.numel() for p in probe.parameters())
    except NotImplementedError:  # an op the meta device lacks: the width bounds above still hold
        n = 0
    if n > MAX_PARAMETERS:
        raise ConfigError(f"{variant} with {config} would have {n:,} parameters ({4 * n / 2**30:.1f} GiB); the "
                          f"limit is {MAX_PARAMETERS:,}: check the layer sizes")
    return build_model(variant, **config)


def read_vectoriser(path: str | os.PathLike) -> dict | None:
    f = model_dir(path) / VECTORISER
    return _read_json(f, "a vectoriser") if f.exists() else None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.json`` and load its safetensors weights; returns it in eval mode."""
    d = model_dir(path)
    cfg = read_config(d)
    weights = regular_file(d / WEIGHTS, MAX_WEIGHTS_BYTES, "model weights")
    try:
        state = load_file(str(weights), device=str(device))  # header checked first: a bad file fails before building
    except Exception as e:  # noqa: BLE001 - safetensors raises its own type (and OSError) for a damaged file
        raise ModelFileError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        model = build_checked(cfg["variant"], cfg["model"])
    except ConfigError as e:
        raise ModelFileError(f"{d / CONFIG}: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{d / WEIGHTS} does not match variant {cfg['variant']!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def model_sha256(path: str | os.PathLike) -> str:
    """Hash of config.json + weights: identifies exactly which model produced an embedding."""
    d = model_dir(path)
    h = hashlib.sha256()
    for name, limit in ((CONFIG, MAX_JSON_BYTES), (WEIGHTS, MAX_WEIGHTS_BYTES)):
        with open(regular_file(d / name, limit, "a model file"), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
