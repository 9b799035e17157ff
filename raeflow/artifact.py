"""A trained model as one object: loaded once from a run or model directory, asked everything afterwards.

Every consumer after training (serve, eval, embed, search, retrieval, finetune, the plots) takes a
:class:`TrainedModel` instead of a path: it owns the built model, its variant, what its inputs are
(:class:`InputSpec`), the document vectoriser saved beside it, its sha256, its code size and, above all, its
**capabilities** — declared by the model class in ``raeflow/models/`` and read here, never guessed from the
variant's name. Plain Python and PyTorch: no Ray.

What is cheap is read from ``config.json`` alone (variant, input spec, code size), so asking an embeddings
directory's code size does not build a model; the model, the vectoriser and the hash load on first use.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raeflow.io import load_model, model_dir, model_sha256, read_config, read_vectoriser
from raeflow.models.capabilities import capabilities_of
from raeflow.errors import InputError, MissingFileError


@dataclass(frozen=True)
class InputSpec:
    """What one input of the model is: ``kind`` "image" (``shape`` (C, H, W)) or "text" / "vector" (``(D,)``).

    ``bounded``: inputs and outputs are intensities in [0, 1] (every model except those with a linear
    decoder, which take any finite value). The one place that says how many values an input has and which
    Pillow mode its images decode to.
    """

    kind: str
    shape: tuple[int, ...]
    bounded: bool = True

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def mode(self) -> str | None:
        """Pillow mode images are converted to ("L" grey, "RGB"); None for vectors."""
        if not self.is_image:
            return None
        c = int(self.shape[0])
        if c not in (1, 3):
            raise InputError(f"image models take 1 or 3 channels; this one takes input_shape {list(self.shape)}")
        return "L" if c == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "bounded": self.bounded}


class TrainedModel:
    """One saved model. ``TrainedModel.load(path)`` accepts a run directory or its ``model/`` directory."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 model: torch.nn.Module | None = None):
        self.path: Path = model_dir(path)
        self.config: dict[str, Any] = read_config(self.path)
        self.variant: str = self.config["variant"]
        self.data: dict[str, Any] = dict(self.config.get("data") or {})
        self.device = torch.device(device)
        if model is not None:  # already built (a trainer's model, a test's): no second load
            self.__dict__["model"] = model.to(self.device).eval()

    @classmethod
    def load(cls, path: "str | os.PathLike | TrainedModel", device: str | torch.device = "cpu") -> "TrainedModel":
        """``path`` may already be a TrainedModel (returned as it is), so every consumer takes either."""
        if isinstance(path, TrainedModel):
            return path
        return cls(path, device)

    # ---------------------------------------------------------------------------------- loaded on first use
    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """The module, weights loaded, in eval mode."""
        return load_model(self.path, device=self.device)

    @functools.cached_property
    def vectoriser(self) -> Any:
        """The document vectoriser fitted at training time (``raeflow.data.text.Vectoriser``), or None."""
        saved = read_vectoriser(self.path)
        if saved is None:
            if self.input.kind == "text":
                raise MissingFileError(f"{self.path} is a document model but has no vectoriser.json (it is saved "
                                        "at training time); cannot turn text into the model's input")
            return None
        from raeflow.data.text import Vectoriser

        return Vectoriser.from_json(saved)

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of config.json + weights: identifies exactly which model produced an embedding."""
        return model_sha256(self.path)

    @functools.cached_property
    def capabilities(self) -> frozenset[str]:
        """What the model class declares it can do (see ``raeflow.models.capabilities``)."""
        return capabilities_of(self.model)

    # -------------------------------------------------------------------------------- from config.json alone
    @functools.cached_property
    def input(self) -> InputSpec:
        shape = self.data.get("input_shape") or self.config["model"].get("input_shape")
        if shape is None:
            shape = self.model.input_shape
        shape = tuple(int(s) for s in shape)
        kind = self.data.get("kind") or ("image" if len(shape) == 3 else "vector")
        bounded = self.config.get("bounded")
        if bounded is None:  # saved before raeflow recorded it: ask the built model
            bounded = bool(getattr(self.model, "bounded", True))
        return InputSpec(kind, shape, bool(bounded))

    @functools.cached_property
    def latent_dim(self) -> int:
        """The code size; 0 for a model without a code (a pixel-level autoregressive model)."""
        saved = self.config.get("latent_dim")
        return int(saved) if saved is not None else int(getattr(self.model, "latent_dim", 0) or 0)

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def describe(self) -> dict[str, Any]:
        """What ``/models`` and the model card say of it."""
        return {"variant": self.variant, "input": self.input.to_dict(), "latent_dim": self.latent_dim,
                "capabilities": sorted(self.capabilities), "dataset": self.data.get("name"),
                "documents": self.input.kind == "text" and read_vectoriser(self.path) is not None,
                "parameters": sum(p.numel() for p in self.model.parameters())}
