"""Dense (deep) autoencoder: the vanilla AE of the literature, any depth, widths and activation."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models.base import Autoencoder, Stage, TrainPlan, mlp
from raeflow.models.rbm import BERNOULLI, GAUSSIAN, POISSON, RBMSettings, RBMStack
from raeflow.registry import register_model
from raeflow.errors import ConfigError

_CODE_ACTS = {"linear": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu}


@register_model("ae", "dense autoencoder, any depth (e.g. 784-1000-500-250-30 of Hinton & Salakhutdinov 2006)")
class DenseAE(Autoencoder):
    """Dense autoencoder ``D -> hidden... -> latent -> reversed(hidden)... -> D``.

    ``tied=True`` reuses the encoder's weight matrices, transposed, in the decoder; with ``activation="linear"``
    and ``loss="mse_linear"`` its optimum spans the principal subspace (Baldi & Hornik 1989), which a test checks.

    ``rbm`` (a dict of :class:`raeflow.models.rbm.RBMSettings`, ``{}`` for Hinton's defaults) pretrains the
    encoder greedily as a stack of RBMs, stages ``rbm-1`` .. ``rbm-n`` (``train.stage_epochs.rbm`` epochs each),
    then unrolls them into encoder and decoder and fine-tunes the whole net, stage ``finetune``
    (``train.stage_epochs.finetune``, default ``train.epochs``), with the run's optimiser. It needs logistic
    hidden units and a linear (Gaussian-hidden top RBM) or sigmoid code. With ``loss="multinomial"`` (word counts
    in, their distribution out) the bottom RBM has constrained Poisson visible units: Hinton & Salakhutdinov's
    document model. ``sparse_init=K`` initialises every
    layer as Martens (2010) did: K non-zero N(0, 1) incoming weights per unit, zero biases.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 30,
                 hidden: Sequence[int] = (1000, 500, 250), activation: str = "relu",
                 code_activation: str = "linear", loss: str = "bce", corruption: dict | None = None,
                 tied: bool = False, rbm: dict | None = None, sparse_init: int | None = None):
        super().__init__(input_shape, latent_dim, loss, corruption)
        if code_activation not in _CODE_ACTS:
            raise ConfigError(f"unknown code_activation {code_activation!r}; use one of {sorted(_CODE_ACTS)}")
        sizes = [self.input_dim, *hidden, latent_dim]
        self.code_activation = code_activation
        self.tied = tied
        self.encoder = mlp(sizes, activation)  # (B, D) -> (B, latent)
        if tied:
            # One bias per decoder layer; the weights are the encoder's, transposed, in reverse order.
            self.decoder_biases = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in reversed(sizes[:-1])])
            self._act = mlp([1, 1], activation, last_activation=True)[-1]
        else:
            self.decoder = mlp(list(reversed(sizes)), activation)  # (B, latent) -> (B, D) pre-activation
        if sparse_init:
            _sparse_init(self, int(sparse_init))
        settings = RBMSettings.from_config(rbm)
        if settings is not None:
            if activation != "sigmoid" or code_activation not in ("linear", "sigmoid"):
                raise ConfigError("RBM pretraining needs activation: sigmoid (Bernoulli hidden units) and "
                                 f"code_activation linear or sigmoid; got {activation!r} / {code_activation!r}")
            if loss not in ("bce", "multinomial"):
                raise ConfigError(f"RBM pretraining models data in [0, 1] (Bernoulli visible units, loss: bce) or "
                                 f"word counts (constrained Poisson visible units, loss: multinomial), not {loss!r}")
            top = GAUSSIAN if code_activation == "linear" else BERNOULLI
            # A multinomial decoder is the unrolled bottom RBM's softmax over words: Poisson visible units.
            bottom = POISSON if loss == "multinomial" else BERNOULLI
            self.rbms = RBMStack(sizes, top, settings, bottom)  # (only for pretraining; unrolled into the layers)
        self.rbm = rbm

    # ------------------------------------------------------------------------------------------ plan
    def stages(self, plan: TrainPlan) -> list[Stage]:
        if self.rbm is None:
            return super().stages(plan)
        ae = ["encoder", "decoder_biases" if self.tied else "decoder"]
        return [*self.rbms.stages("rbms", plan.epochs_for("rbm"), frozen_besides=ae),
                Stage("finetune", plan.epochs_for("finetune"), frozen=["rbms"])]

    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        if stage.name == "finetune" and fresh:  # unroll: tied initial weights, untied afterwards (unless tied)
            enc = [m for m in self.encoder if isinstance(m, nn.Linear)]
            if self.tied:
                weights, biases = [None] * len(enc), list(self.decoder_biases)
            else:
                dec = [m for m in self.decoder if isinstance(m, nn.Linear)]
                weights, biases = [m.weight for m in dec], [m.bias for m in dec]
            self.rbms.unroll_into(enc, weights, biases)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        if stage.startswith("rbm-"):
            if self.rbm is None:
                raise ConfigError(f"stage {stage!r}: this ae has no RBMs (set model.rbm)")
            return self.rbms.terms(stage, x)
        return super().forward(x, y, stage=stage, phase=phase)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return _CODE_ACTS[self.code_activation](self.encoder(x.flatten(1)))

    def encoder_modules(self) -> list[nn.Module]:
        # The code activation lives in _encode, outside self.encoder: append it so that a fine-tuned classifier
        # sees the code itself (without it a one-layer sigmoid CAE would become a linear model plus a head).
        act = {"linear": None, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}[self.code_activation]
        return [self.encoder] if act is None else [self.encoder, act()]

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if not self.tied:
            return self.decoder(z)
        linears = [m for m in self.encoder if isinstance(m, nn.Linear)][::-1]
        h = z
        for i, (lin, b) in enumerate(zip(linears, self.decoder_biases)):
            h = F.linear(h, lin.weight.t(), b)
            if i < len(linears) - 1:
                h = self._act(h)
        return h


@torch.no_grad()
def _sparse_init(model: nn.Module, k: int) -> None:
    """Martens (2010): each unit gets ``k`` non-zero N(0, 1) incoming weights (all of them if it has fewer
    inputs), the rest and the biases zero, so units start distinct without saturating. Every nn.Linear in
    ``model`` (tied decoders read the encoder's weights)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            w = torch.zeros(out_f, in_f)
            for i in range(out_f):
                idx = torch.randperm(in_f)[:k]
                w[i, idx] = torch.randn(len(idx))
            m.weight.copy_(w)
            m.bias.zero_()
