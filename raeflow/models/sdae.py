"""Stacked denoising autoencoder (Vincent et al. 2010): greedy layer-wise denoising pretraining, then fine-tuning.

Stage ``pretrain-k`` trains layer k alone as a one-layer denoising AE: its input is the clean output of the
(frozen) layers below, corrupted; it reconstructs that clean input through its own decoder ``dec{k}``. Stage
``finetune`` then trains the whole encoder stack plus a softmax head with cross-entropy on labels, and the model
is selected by validation error, as in the paper (its MNIST figure: SdA-3, masking 25%, 1.28% test error).

Layers are attributes ``enc1, enc2, ...`` / ``dec1, dec2, ...`` (not a ModuleList) because ``Stage.frozen`` and
``Phase.modules`` name attributes. Each stage freezes every module it does not train, not only the layers below:
under DistributedDataParallel a parameter that requires a gradient but receives none is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.base import Autoencoder, OptimSpec, Phase, Stage, TrainPlan, reconstruction_loss
from raeflow.models.classifier import classification_terms
from raeflow.models.rbm import BERNOULLI, RBMSettings, RBMStack
from raeflow.registry import register_model
from raeflow.errors import ConfigError

#: Vincent et al.'s MNIST setting: each input zeroed with probability 0.25.
DEFAULT_CORRUPTION = {"kind": "masking", "level": 0.25}


@register_model("sdae", "stacked denoising autoencoder: layer-wise pretraining, then supervised fine-tuning "
                        "(Vincent et al. 2010)")
class StackedDAE(Autoencoder):
    """``D -> hidden[0] -> ... -> hidden[-1]`` sigmoid layers, one decoder per layer, and a softmax head.

    ``latent_dim``, when given, is the width of the top layer (the code) and replaces ``hidden[-1]``; by default
    the code is ``hidden[-1]``. ``corruption=None`` turns the denoising off (plain stacked autoencoders).
    ``rbm`` (settings of :class:`raeflow.models.rbm.RBMSettings`; ``{}``: Hinton's) pretrains the stack as RBMs
    instead (stages ``rbm-1`` .. ``rbm-n``, ``train.stage_epochs.rbm`` epochs each: a deep belief net's greedy
    pretraining), copied into the layers when fine-tuning starts.

    ``corruption_levels`` gives each layer its own level of the corruption's kind (the reference reproduction of
    Vincent et al.: 0.1 / 0.2 / 0.3 from the bottom up; the paper chose levels on validation). ``finetune_optim``
    fixes the fine-tuning optimiser whatever the run's (fields of :class:`raeflow.models.base.OptimSpec`, with
    ``momentum`` a number): the paper and that reproduction fine-tune by plain SGD while pretraining often wants
    Adam. Neither given: one level for every layer and the run's optimiser throughout, as before.

    ``tied=True`` gives each layer's decoder only a bias and the encoder's weight matrix, transposed (W' = Wᵀ), as
    the denoising autoencoders of Vincent et al. and the reference tutorial are built: the decoder cannot grow to
    undo a shrunken encoder, so reconstruction is what shapes the encoder's weights. ``dec{k}`` then holds the bias
    alone; the decoders stay frozen while fine-tuning, as untied ones do.
    """

    #: its fine-tuning stage trains a softmax head on the codes, so it classifies as well as reconstructs
    capabilities = Autoencoder.capabilities | {cap.CLASSIFY}
    selection_metric = "val_error"

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), hidden: Sequence[int] = (1000, 1000, 1000),
                 num_classes: int = 10, latent_dim: int | None = None, loss: str = "bce",
                 corruption: dict | None = DEFAULT_CORRUPTION, dropout: float = 0.0, rbm: dict | None = None,
                 corruption_levels: Sequence[float] | None = None, finetune_optim: dict | None = None,
                 tied: bool = False):
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {dropout}")
        widths = [int(h) for h in hidden]
        if latent_dim is not None:
            if not widths:
                widths = [int(latent_dim)]
            widths[-1] = int(latent_dim)
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"sdae needs at least one hidden layer of positive width; got {list(hidden)}")
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be at least 2; got {num_classes}")
        super().__init__(input_shape, widths[-1], loss, corruption)
        self.sizes = [self.input_dim, *widths]  # [D, h1, ..., hn]
        self.num_layers = len(widths)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.tied = bool(tied)
        for k in range(1, self.num_layers + 1):
            # enc{k}: (B, sizes[k-1]) -> (B, sizes[k]) sigmoid units; dec{k}: back, pre-activation.
            setattr(self, f"enc{k}", nn.Sequential(nn.Linear(self.sizes[k - 1], self.sizes[k]), nn.Sigmoid()))
            setattr(self, f"dec{k}", TiedDecoder(self.sizes[k - 1]) if self.tied
                    else nn.Linear(self.sizes[k], self.sizes[k - 1]))
        self.head = nn.Linear(self.sizes[-1], self.num_classes)  # (B, hn) -> (B, classes) logits
        settings = RBMSettings.from_config(rbm)
        if settings is not None:
            self.rbms = RBMStack(self.sizes, BERNOULLI, settings)  # sigmoid layers: Bernoulli hidden units
        self.rbm = rbm
        self._layer_corruptions = None  # one Corruption per layer when corruption_levels is given
        if corruption_levels is not None:
            if self.corruption is None:
                raise ConfigError("sdae corruption_levels need a corruption kind (model.corruption)")
            if len(corruption_levels) != self.num_layers:
                raise ConfigError(f"sdae has {self.num_layers} layers but {len(corruption_levels)} corruption_levels")
            # the Corruption constructor checks each level against the kind's range
            self._layer_corruptions = [dataclasses.replace(self.corruption, level=float(v)) for v in corruption_levels]
        self.finetune_optim = None if finetune_optim is None else _optim_spec(finetune_optim)

    # ------------------------------------------------------------------------------------------ plan
    def _names(self, prefix: str) -> list[str]:
        return [f"{prefix}{k}" for k in range(1, self.num_layers + 1)]

    def stages(self, plan: TrainPlan) -> list[Stage]:
        everything = [*self._names("enc"), *self._names("dec"), "head"]
        out = []
        if self.rbm is not None:
            out = self.rbms.stages("rbms", plan.epochs_for("rbm"), frozen_besides=everything)
            tuned = [*self._names("enc"), "head"]
            return [*out, Stage("finetune", plan.epochs_for("finetune"),
                                phases=[Phase("main", modules=tuned, optim=self.finetune_optim)],
                                supervised=True, frozen=[*self._names("dec"), "rbms"])]
        pre = plan.epochs_for("pretrain")
        if pre > 0:  # pretrain=0: the randomly initialised baseline of the paper's comparison
            for k in range(1, self.num_layers + 1):
                trained = [f"enc{k}", f"dec{k}"]
                out.append(Stage(f"pretrain-{k}", pre, phases=[Phase("main", modules=trained)],
                                 frozen=[m for m in everything if m not in trained]))
        tuned = [*self._names("enc"), "head"]
        out.append(Stage("finetune", plan.epochs_for("finetune"),
                         phases=[Phase("main", modules=tuned, optim=self.finetune_optim)],
                         supervised=True, frozen=self._names("dec")))
        return out

    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        if self.rbm is not None and stage.name == "finetune" and fresh:
            n = self.num_layers
            decoders = [getattr(self, f"dec{k}") for k in range(n, 0, -1)]  # from the code outwards
            # a tied decoder has no weight of its own to receive the RBM's (None: leave it to the encoder's)
            self.rbms.unroll_into([getattr(self, f"enc{k}")[0] for k in range(1, n + 1)],
                                  [None if self.tied else d.weight for d in decoders], [d.bias for d in decoders])

    # ------------------------------------------------------------------------------------------ layers
    def _hidden(self, x: torch.Tensor, upto: int, dropout: float = 0.0) -> torch.Tensor:
        """Output of layers 1..upto: (B, *input_shape) -> (B, sizes[upto]); upto=0 is the flattened input.
        ``dropout`` after every layer (training mode only): the fine-tuning pass's, never pretraining's."""
        h = x.flatten(1)
        for k in range(1, upto + 1):
            h = F.dropout(getattr(self, f"enc{k}")(h), dropout, self.training)
        return h

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._hidden(x, self.num_layers)

    def _decode_layer(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Layer k's decoder, pre-activation: (B, sizes[k]) -> (B, sizes[k-1])."""
        dec = getattr(self, f"dec{k}")
        return dec(h, getattr(self, f"enc{k}")[0].weight) if self.tied else dec(h)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The decoders stacked in reverse: dec_n, sigmoid, ..., dec_1 (pre-activation, (B, D))."""
        h = z
        for k in range(self.num_layers, 0, -1):
            h = self._decode_layer(h, k)
            if k > 1:
                h = torch.sigmoid(h)  # the layer below's units are sigmoid
        return h

    def _corrupt_layer(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Layer k's pretraining input, corrupted at its own level when ``corruption_levels`` is set."""
        if self._layer_corruptions is None or not self.training:
            return self.corrupt(h)
        return self._layer_corruptions[k - 1](h)

    def encoder_modules(self) -> list[nn.Module]:
        return [getattr(self, f"enc{k}") for k in range(1, self.num_layers + 1)]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, num_classes) logits; dropout between layers while training."""
        return self.head(self._hidden(x, self.num_layers, self.dropout))

    def _layer_loss_kind(self, k: int) -> str:
        # Layer 1 reconstructs the data with the configured loss; higher layers reconstruct sigmoid units in
        # (0, 1), for which cross-entropy (Vincent et al.'s choice for such inputs) or squared error is apt.
        if k == 1:
            return self.loss_kind
        return "bce" if self.loss_kind == "bce" else "mse"

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "finetune",
                phase: str = "main") -> dict[str, torch.Tensor]:
        if stage.startswith("rbm-") and self.rbm is not None:
            return self.rbms.terms(stage, x)
        if stage.startswith("pretrain-"):
            k = int(stage.rsplit("-", 1)[1])
            if not 1 <= k <= self.num_layers:
                raise ConfigError(f"sdae has {self.num_layers} layers; no stage {stage!r}")
            with torch.no_grad():  # the layers below are frozen: their clean output is this layer's data
                clean = self._hidden(x, k - 1)  # (B, sizes[k-1])
            raw = self._decode_layer(getattr(self, f"enc{k}")(self._corrupt_layer(clean, k)), k)
            recon = reconstruction_loss(raw, clean, self._layer_loss_kind(k))
            return {"loss": recon, "recon": recon}
        if stage == "finetune":
            if y is None:
                raise ConfigError("sdae's finetune stage needs labels")
            return classification_terms(self.predict(x), y)
        raise ConfigError(f"sdae has no stage {stage!r}; its stages are pretrain-1..pretrain-{self.num_layers} "
                         "and finetune")


class TiedDecoder(nn.Module):
    """A decoder layer that owns only its bias and reads the encoder layer's weight, transposed. The weight is
    passed in rather than held, so that freezing this module (fine-tuning) never freezes the encoder's weight."""

    def __init__(self, out_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, h: torch.Tensor, enc_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, enc_weight.t(), self.bias)  # enc_weight (out, in): (B, out) -> (B, in)


def _optim_spec(d: dict) -> OptimSpec:
    """``{kind, lr, momentum, weight_decay, schedule}`` -> OptimSpec; ``momentum`` a number (constant)."""
    known = {f.name for f in dataclasses.fields(OptimSpec)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown finetune_optim settings {sorted(unknown)}; known: {sorted(known)}")
    d = dict(d)
    if "momentum" in d:
        d["momentum"] = ((0, float(d["momentum"])),)
    spec = OptimSpec(**d)
    if spec.kind not in ("adam", "adamw", "sgd") or spec.lr <= 0:
        raise ConfigError(f"finetune_optim needs kind adam|adamw|sgd and a positive lr; got {d}")
    return spec
