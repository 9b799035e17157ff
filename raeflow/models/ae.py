"""Dense (deep) autoencoder: the vanilla AE of the literature, any depth, widths and activation."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models.base import Autoencoder, mlp
from raeflow.registry import register_model
from raeflow.errors import ConfigError

_CODE_ACTS = {"linear": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu}


@register_model("ae", "dense autoencoder, any depth (e.g. 784-1000-500-250-30 of Hinton & Salakhutdinov 2006)")
class DenseAE(Autoencoder):
    """Dense autoencoder ``D -> hidden... -> latent -> reversed(hidden)... -> D``.

    ``tied=True`` reuses the encoder's weight matrices, transposed, in the decoder; with ``activation="linear"``
    and ``loss="mse_linear"`` its optimum spans the principal subspace (Baldi & Hornik 1989), which a test checks.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 30,
                 hidden: Sequence[int] = (1000, 500, 250), activation: str = "relu",
                 code_activation: str = "linear", loss: str = "bce", corruption: dict | None = None,
                 tied: bool = False):
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
