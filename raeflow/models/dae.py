"""Denoising autoencoder (Vincent et al. 2008, 2010): reconstruct the clean input from a corrupted copy.

Corruption is already an option of every reconstructing variant (``Autoencoder.corrupt``); the DAE is the
dense AE for which it is the point, so here it is on by default (masking noise, 25% of inputs zeroed: the
setting of Vincent et al.'s MNIST results). It is drawn afresh for every batch, in training mode only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raeflow.models.ae import DenseAE
from raeflow.registry import register_model
from raeflow.errors import ConfigError

DEFAULT_CORRUPTION = {"kind": "masking", "level": 0.25}


@register_model("dae", "denoising autoencoder: masking / gaussian / salt-and-pepper corruption per batch "
                       "(Vincent et al. 2008)")
class DenoisingAE(DenseAE):
    """Dense AE trained to map a corrupted input to the clean one.

    ``corruption={"kind": "masking" | "gaussian" | "salt_and_pepper", "level": ...}``: level is the zeroed /
    flipped fraction, or the Gaussian noise std. ``denoise(x)`` (the serve endpoint) is the reconstruction.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 30,
                 hidden: Sequence[int] = (1000, 500, 250), activation: str = "relu",
                 code_activation: str = "linear", loss: str = "bce",
                 corruption: dict | None = DEFAULT_CORRUPTION, tied: bool = False):
        if not corruption:
            raise ConfigError("a denoising autoencoder needs a corruption, e.g. {'kind': 'masking', 'level': 0.25}; "
                             "for none, use variant 'ae'")
        super().__init__(input_shape, latent_dim, hidden, activation, code_activation, loss, dict(corruption), tied)

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) noisy inputs -> (B, *input_shape) cleaned: the reconstruction (no corruption in
        eval mode, which is where a denoiser is used)."""
        return self.reconstruct(x)
