"""A classifier fine-tuned from any trained autoencoder's encoder: ``encoder_modules()`` + a softmax head.

Its config (``config.json``) holds the base autoencoder's variant and constructor arguments, so the encoder is
rebuilt from the same code with no reference to the base model's files; the weights live in the classifier's
own safetensors. :meth:`Classifier.from_autoencoder` copies a trained encoder's weights in (what
``raeflow finetune`` does); building from the config alone gives a randomly initialised network, the baseline.

The encoder modules are applied in order to the input as the autoencoder receives it, ``(B, *input_shape)``.
A module whose first layer is dense (``nn.Linear``) gets its input flattened to ``(B, features)`` first, which
is what dense encoders (``ae``, ``sdae``) expect and what sits between a conv stack and its dense bottleneck.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.base import Stage, TrainPlan
from raeflow.registry import build_model, get_variant, register_model
from raeflow.errors import ConfigError


def classification_terms(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy (the loss) and the fraction misclassified (``error``, a float tensor) for (B, K) logits."""
    k = logits.shape[1]
    if y.is_floating_point() or y.is_complex():
        raise ConfigError(f"labels must be integer class indices; got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise ConfigError(f"labels must be class indices in 0..{k - 1}; got {lo}..{hi} (is num_classes too small?)")
    ce = F.cross_entropy(logits, y.long())
    error = (logits.argmax(1) != y).float().mean()
    return {"loss": ce, "ce": ce, "error": error}


def _first_layer(m: nn.Module) -> nn.Module:
    """The first leaf module of ``m`` in definition order (``m`` itself when it has no children)."""
    for sub in m.modules():
        if not list(sub.children()):
            return sub
    return m


@register_model("classifier", "softmax classifier fine-tuned from an autoencoder's encoder", kind="classifier")
class Classifier(nn.Module):
    """``encoder_modules()`` of ``base_variant`` built from ``base_config``, then a head: ``Linear`` to
    ``num_classes`` logits, or ``Linear(head_hidden) -> ReLU -> Linear`` (Masci et al. put a 300-unit dense layer
    before the softmax). ``dropout`` (Srivastava et al. 2014) drops encoder features and head units while
    training; it is what lets a pretrained MLP/CNN reach the papers' error rates with a modern optimiser.
    ``pretrained`` is provenance only (where the initial encoder weights came from)."""

    #: a classifier answers labels; ``encode`` gives its penultimate features (for probes and search)
    capabilities = frozenset({cap.CLASSIFY, cap.ENCODE})
    selection_metric = "val_error"

    def __init__(self, base_variant: str, base_config: dict[str, Any], num_classes: int = 10,
                 head_hidden: int | None = None, input_shape: Sequence[int] | None = None,
                 pretrained: dict[str, Any] | None = None, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {dropout}")
        self.dropout = float(dropout)
        info = get_variant(base_variant)
        if info.kind != "autoencoder":
            raise ConfigError(f"a classifier is built on an autoencoder's encoder; {base_variant!r} is a {info.kind}")
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be at least 2; got {num_classes}")
        if head_hidden is not None and int(head_hidden) < 1:
            raise ConfigError(f"head_hidden must be a positive width (or null); got {head_hidden}")
        base = build_model(base_variant, **base_config)
        if input_shape is not None and tuple(int(s) for s in input_shape) != base.input_shape:
            raise ConfigError(f"the data's shape {list(input_shape)} does not match the {base_variant} model's "
                             f"input shape {list(base.input_shape)}")
        self.input_shape = base.input_shape
        self.num_classes = int(num_classes)
        try:
            modules = base.encoder_modules()
        except AttributeError:  # e.g. PCA: a projection held in buffers, nothing to fine-tune
            raise ConfigError(f"variant {base_variant!r} has no encoder modules to fine-tune") from None
        self.encoder = nn.ModuleList(modules)  # the rest of `base` (its decoder) is dropped here
        if not any(p.requires_grad for p in self.encoder.parameters()):
            raise ConfigError(f"variant {base_variant!r} has no trainable encoder parameters to fine-tune")
        with torch.no_grad():  # the feature width, measured rather than derived, so any encoder works
            was = self.encoder.training
            self.encoder.eval()
            features = self.features(torch.zeros(1, *self.input_shape)).shape[1]
            self.encoder.train(was)
        self.feature_dim = int(features)
        if head_hidden:  # Dropout is a no-op at p=0 and in eval mode, so the layout is the same either way
            self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(features, int(head_hidden)), nn.ReLU(),
                                      nn.Dropout(self.dropout), nn.Linear(int(head_hidden), self.num_classes))
        else:
            self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(features, self.num_classes))
        self.latent_dim = int(head_hidden) if head_hidden else self.feature_dim  # what `encode` returns

    #: a classifier's inputs are what its base autoencoder took; images in [0, 1]
    bounded = True

    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        """The trainer's stage hook (see ``Autoencoder.enter_stage``): nothing to do for a classifier."""

    @classmethod
    def from_autoencoder(cls, base: nn.Module, num_classes: int, head_hidden: int | None = None,
                         input_shape: Sequence[int] | None = None,
                         pretrained: dict[str, Any] | None = None, dropout: float = 0.0) -> "Classifier":
        """A classifier whose encoder starts from ``base``'s trained encoder weights (the head is random)."""
        shape = list(base.input_shape if input_shape is None else input_shape)
        clf = cls(base.variant, dict(base.config), num_classes, head_hidden, shape, pretrained, dropout)
        for mine, theirs in zip(clf.encoder, base.encoder_modules()):
            mine.load_state_dict(theirs.state_dict())
        return clf

    # ------------------------------------------------------------------------------------------ network
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, feature_dim): the encoder's output, flattened."""
        h = x.reshape(x.shape[0], *self.input_shape)
        for m in self.encoder:
            if h.dim() > 2 and isinstance(_first_layer(m), nn.Linear):
                h = h.flatten(1)
            h = m(h)
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"encoder module {type(m).__name__} returned {type(h).__name__}, not a tensor")
        return h.flatten(1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, num_classes) logits."""
        return self.head(self.features(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the softmax reads: the head's hidden layer, or the encoder's output."""
        h = self.features(x)
        if len(self.head) > 2:  # the hidden layer's ReLU output (its dropout is identity in eval mode)
            h = self.head[:3](h)
        return h

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("finetune", plan.epochs_for("finetune"), supervised=True)]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "finetune",
                phase: str = "main") -> dict[str, torch.Tensor]:
        if y is None:
            raise ConfigError("the classifier needs labels to compute its loss")
        return classification_terms(self.predict(x), y)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "base_variant": self.config["base_variant"],
                "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "parameters": sum(p.numel() for p in self.parameters())}
