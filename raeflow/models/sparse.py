"""Sparse autoencoder: a dense AE whose sigmoid code units are pushed to be rarely active (Ng, CS294A notes).

The penalty is β · Σ_j KL(ρ ‖ ρ̂_j), with ρ̂_j the mean activation of code unit j over the batch: each unit is
asked to fire on about a fraction ρ of the examples, so every example is explained by a few units.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raeflow.losses import kl_sparsity
from raeflow.models.ae import DenseAE
from raeflow.models.base import reconstruction_loss
from raeflow.registry import register_model
from raeflow.errors import ConfigError


@register_model("sparse", "sparse autoencoder: sigmoid code + beta * KL(rho || mean activation) (Ng)")
class SparseAE(DenseAE):
    """Dense AE with a sigmoid code and a KL sparsity penalty; loss terms ``recon`` and ``sparsity``.

    Defaults follow Ng's MNIST exercise: one hidden (code) layer of 196 sigmoid units, β = 3; ρ = 0.05.
    The code must be sigmoid (ρ̂ is a firing probability), so ``code_activation`` is not an option here.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 196,
                 hidden: Sequence[int] = (), activation: str = "sigmoid", loss: str = "bce",
                 rho: float = 0.05, beta: float = 3.0, corruption: dict | None = None, tied: bool = False):
        if not 0 < rho < 1:
            raise ConfigError(f"sparsity target rho must be in (0, 1), got {rho}")
        if beta < 0:
            raise ConfigError(f"sparsity weight beta must be >= 0, got {beta}")
        super().__init__(input_shape, latent_dim, hidden, activation, code_activation="sigmoid", loss=loss,
                         corruption=corruption, tied=tied)
        self.rho = float(rho)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        h = self._encode(self.corrupt(x))  # (B, k) in (0, 1)
        recon = reconstruction_loss(self._decode_raw(h), x, self.loss_kind)
        # ρ̂ is a batch statistic: with data-parallel workers each estimates it on its own shard.
        sparsity = kl_sparsity(self.rho, h.mean(0))
        return {"loss": recon + self.beta * sparsity, "recon": recon, "sparsity": sparsity}
