"""Contractive autoencoder (Rifai et al. 2011): penalise the encoder's sensitivity to its input.

Loss = reconstruction + λ · ‖J_f(x)‖²_F, the squared Frobenius norm of the Jacobian of the code with respect to
the input, averaged over the batch. For the paper's encoder (one sigmoid layer) the norm has a closed form
(cheap: no extra backward pass); for any other encoder it is computed exactly by autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from raeflow.models import capabilities as cap
from raeflow.losses import contractive_penalty_sigmoid, jacobian_frobenius_sq
from raeflow.models.ae import DenseAE
from raeflow.models.base import reconstruction_loss
from raeflow.registry import register_model
from raeflow.errors import ConfigError

JACOBIAN_METHODS = ("auto", "closed_form", "autograd")


@register_model("contractive", "contractive autoencoder: + lambda * ||d code / d input||_F^2 (Rifai et al. 2011)")
class ContractiveAE(DenseAE):
    """Dense AE with a Jacobian penalty; loss terms ``recon`` and ``contractive``.

    Default: the paper's single hidden layer of 1000 sigmoid units. ``jacobian``: ``"closed_form"`` (only for
    one sigmoid layer), ``"autograd"`` (any encoder) or ``"auto"`` (closed form where it applies).
    """

    #: the penalty makes codes insensitive to small input perturbations, so its reconstruction is a denoiser
    #: (Rifai et al. 2011) even without an input corruption
    capabilities = DenseAE.capabilities | {cap.DENOISE}

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 1000,
                 hidden: Sequence[int] = (), activation: str = "sigmoid", code_activation: str = "sigmoid",
                 loss: str = "bce", lam: float = 0.1, jacobian: str = "auto", corruption: dict | None = None,
                 tied: bool = False):
        if lam < 0:
            raise ConfigError(f"contractive weight lam must be >= 0, got {lam}")
        if jacobian not in JACOBIAN_METHODS:
            raise ConfigError(f"unknown jacobian method {jacobian!r}; use one of {JACOBIAN_METHODS}")
        super().__init__(input_shape, latent_dim, hidden, activation, code_activation, loss, corruption, tied)
        single_sigmoid = len(hidden) == 0 and code_activation == "sigmoid"
        if jacobian == "closed_form" and not single_sigmoid:
            raise ConfigError("jacobian='closed_form' needs one sigmoid layer (hidden=(), code_activation='sigmoid'); "
                             "use 'autograd' for other encoders")
        self.lam = float(lam)
        self.jacobian = jacobian
        self.closed_form = single_sigmoid and jacobian != "autograd"

    def penalty(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """‖J_f(x)‖²_F per example: x (B, *input_shape) -> (B,); ``h`` = the codes of x when already computed."""
        x = x.flatten(1)  # (B, D)
        if self.closed_form:
            lin: nn.Linear = self.encoder[0]
            return contractive_penalty_sigmoid(self._encode(x) if h is None else h, lin.weight)
        return jacobian_frobenius_sq(self._encode, x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        x_in = self.corrupt(x)
        h = self._encode(x_in)  # (B, k)
        recon = reconstruction_loss(self._decode_raw(h), x, self.loss_kind)
        contractive = self.penalty(x_in, h).mean()
        return {"loss": recon + self.lam * contractive, "recon": recon, "contractive": contractive}
