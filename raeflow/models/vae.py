"""Variational autoencoder (Kingma & Welling 2013) with a dense or a convolutional backbone.

The encoder gives a diagonal Gaussian posterior q(z|x) = N(μ, diag σ²); a code is drawn as z = μ + σ·ε (the
reparameterisation trick, so gradients reach μ and σ); the decoder gives p(x|z), Bernoulli (``loss="bce"``) or
Gaussian with a fixed std (``loss="mse"`` / ``"mse_linear"``). Training minimises the negative ELBO
``recon + β·kl`` with ``recon = −log p(x|z)`` and the closed-form ``kl = KL(q(z|x) ‖ N(0, I))``, in nats per
example.
``log_likelihood`` estimates log p(x) with the importance-weighted bound of Burda et al. (2015); ``iwae_k`` > 1
trains on that bound too (the IWAE).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from raeflow.models import capabilities as cap
from raeflow.losses import (bernoulli_log_likelihood, gaussian_fixed_std_log_likelihood, gaussian_kl,
                            gaussian_log_density, log_mean_exp)
from raeflow.models.base import Autoencoder, mlp
from raeflow.registry import register_model
from raeflow.errors import ConfigError

BACKBONES = ("dense", "conv")


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, F): stride-2 3x3 convolutions, each halving H and W (rounding up), then flatten."""

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.ReLU()]
            c = out
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, F) -> (B, C, H, W) logits: the mirror of :class:`ConvEncoder` with transposed convolutions.

    ``sizes`` are the spatial sizes the encoder went through, e.g. [(28, 28), (14, 14), (7, 7)]; each transposed
    convolution doubles the size and ``output_padding`` (0 or 1) restores odd sizes exactly, so any H x W works.
    """

    def __init__(self, out_channels: int, channels: Sequence[int], sizes: Sequence[tuple[int, int]]):
        super().__init__()
        self.start = (channels[-1], *sizes[-1])  # (C_last, h, w)
        layers: list[nn.Module] = []
        outs = list(reversed(channels[:-1])) + [out_channels]
        c = channels[-1]
        for i, out in enumerate(outs):
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            # ConvTranspose2d(k=3, s=2, p=1) gives 2·n − 1 + output_padding.
            pad = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))
            layers.append(nn.ConvTranspose2d(c, out, 3, stride=2, padding=1, output_padding=pad))
            if i < len(outs) - 1:
                layers.append(nn.ReLU())
            c = out
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f.reshape(f.shape[0], *self.start))


@register_model("vae", "variational autoencoder, dense or conv backbone, Bernoulli or Gaussian likelihood, "
                       "IWAE objective and log-likelihood (Kingma & Welling 2013, Burda et al. 2015)")
class VAE(Autoencoder):
    """VAE; loss terms ``recon`` (−log p(x|z), one posterior sample) and ``kl``; ``loss = recon + beta·kl``.

    Dense backbone (default 784-400-20, ReLU, as Kingma & Welling's MNIST model): ``D -> hidden... -> (μ, log σ²)``
    and ``latent -> reversed(hidden)... -> D``. Conv backbone (images only): ``conv_channels`` stride-2 convolutions,
    then the dense ``hidden`` layers, and the mirror image back; it adapts to any H x W (8x8 digits, 28x28 MNIST).
    ``binarize``: draw x ~ Bernoulli(pixels) afresh for every training batch (dynamic binarisation, Burda et
    al. 2015); both the input and the target are the binary draw. ``obs_std``: the fixed std of the Gaussian
    likelihood (``loss="mse"``: mean = sigmoid(decoder), ``"mse_linear"``: mean = decoder output).
    ``iwae_k`` > 1 trains the importance-weighted bound with k posterior draws per example instead of the ELBO
    (the IWAE of Burda et al. 2015: same network, a tighter objective, k decoder passes a step).
    """

    capabilities = frozenset({cap.ENCODE, cap.RECONSTRUCT, cap.GENERATE, cap.POSTERIOR, cap.LIKELIHOOD})

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 20,
                 hidden: Sequence[int] = (400,), activation: str = "relu", loss: str = "bce",
                 backbone: str = "dense", conv_channels: Sequence[int] = (32, 64), beta: float = 1.0,
                 binarize: bool = False, obs_std: float = 0.1, iwae_k: int = 1, corruption: dict | None = None):
        super().__init__(input_shape, latent_dim, loss, corruption)
        if loss not in ("bce", "mse", "mse_linear"):
            raise ConfigError(f"unknown likelihood {loss!r}; use 'bce' (Bernoulli), 'mse' or 'mse_linear' (Gaussian)")
        if backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {backbone!r}; use one of {BACKBONES}")
        if binarize and loss != "bce":
            raise ConfigError("binarize=True draws binary pixels: it needs the Bernoulli likelihood (loss='bce')")
        if beta < 0 or obs_std <= 0:
            raise ConfigError(f"need beta >= 0 and obs_std > 0, got beta={beta}, obs_std={obs_std}")
        if iwae_k < 1 or (iwae_k > 1 and beta != 1.0):
            raise ConfigError(f"iwae_k must be >= 1, and the importance-weighted bound has no beta (set beta=1); "
                              f"got iwae_k={iwae_k}, beta={beta}")
        self.backbone, self.beta, self.binarize, self.obs_std = backbone, float(beta), bool(binarize), float(obs_std)
        self.iwae_k = int(iwae_k)
        hidden = list(hidden)
        if backbone == "dense":
            self.encoder = mlp([self.input_dim, *hidden], activation, last_activation=True)  # (B, D) -> (B, h)
            feat = hidden[-1] if hidden else self.input_dim
            self.decoder = mlp([latent_dim, *reversed(hidden), self.input_dim], activation)  # -> (B, D) logits
        else:
            if len(self.input_shape) != 3 or not conv_channels:
                raise ConfigError(f"backbone='conv' needs (C, H, W) images and at least one conv channel count; "
                                 f"got input_shape {self.input_shape}, conv_channels {list(conv_channels)}")
            c, h, w = self.input_shape
            sizes = [(h, w)]
            for _ in conv_channels:
                sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))  # stride 2, padding 1, k 3
            flat = conv_channels[-1] * sizes[-1][0] * sizes[-1][1]
            self.encoder = nn.Sequential(ConvEncoder(c, conv_channels),
                                         mlp([flat, *hidden], activation, last_activation=True))
            feat = hidden[-1] if hidden else flat
            self.decoder = nn.Sequential(mlp([latent_dim, *reversed(hidden), flat], activation, last_activation=True),
                                         ConvDecoder(c, conv_channels, sizes))
        self.mu = nn.Linear(feat, latent_dim)
        self.logvar = nn.Linear(feat, latent_dim)

    # ------------------------------------------------------------------------------------- the model
    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder, self.mu]

    def encode_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (μ, log σ²), each (B, latent_dim)."""
        x = x.reshape(x.shape[0], *self.input_shape) if self.backbone == "conv" else x.flatten(1)
        f = self.encoder(x)  # (B, features)
        return self.mu(f), self.logvar(f)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_stats(x)[0]  # the posterior mean: deterministic embeddings

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).flatten(1)  # (B, D) logits / Gaussian means before the output map

    def log_px_given_z(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) from decoder outputs: raw (..., D), x (B, D) broadcast against it -> (...)."""
        if self.loss_kind == "bce":
            return bernoulli_log_likelihood(raw, x)
        return gaussian_fixed_std_log_likelihood(self._activate(raw), x, self.obs_std)

    def maybe_binarize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training mode with ``binarize``: a fresh Bernoulli draw of the pixels; otherwise x unchanged."""
        if self.binarize and self.training:
            return torch.bernoulli(x.clamp(0, 1), generator=generator)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        # The loss samples z in eval mode too: the validation loss is then the same (negative) bound estimate.
        x = self.maybe_binarize(x)
        mu, logvar = self.encode_stats(self.corrupt(x))
        kl = gaussian_kl(mu, logvar).mean()
        if self.iwae_k > 1:
            # Burda et al.'s objective: -log (1/k) sum_i w_i with w_i = p(x, z_i) / q(z_i | x), z_i ~ q(z | x). It
            # bounds log p(x) more tightly than the ELBO as k grows; recon and kl stay the ELBO's terms (over the
            # same k draws) so runs with and without it read alike.
            log_w, log_px = self._log_weights(x.flatten(1), mu, logvar, self.iwae_k)  # (k, B) each
            return {"loss": -log_mean_exp(log_w, dim=0).mean(), "recon": -log_px.mean(), "kl": kl}
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # (B, k), reparameterised
        recon = -self.log_px_given_z(self._decode_raw(z), x.flatten(1)).mean()
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl}

    def _log_weights(self, xf: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, s: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """s reparameterised draws z_i ~ q(z|x) per example: (log p(x, z_i) - log q(z_i|x), log p(x|z_i)), each
        (s, B). ``xf`` (B, D) flat inputs; μ, log σ² (B, latent)."""
        eps = torch.randn((s, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # (s, B, latent)
        b = mu.shape[0]
        raw = self._decode_raw(z.reshape(s * b, -1)).reshape(s, b, -1)  # (s, B, D)
        log_px = self.log_px_given_z(raw, xf)
        return log_px + gaussian_log_density(z) - gaussian_log_density(z, mu, logvar), log_px

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n draws of the prior N(0, I): (n, *input_shape), the likelihood's mean (pixel probabilities)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                       chunk_elements: int = 1 << 24) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) in nats per example, (B, *input_shape) -> (B,).

        log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al. 2015): a lower bound on log p(x)
        that tightens as k grows; k = 1 is the ELBO (with a sampled instead of closed-form KL). Its negation is
        the "NLL in nats" papers report. The literature uses k = 5000: k decoder passes per image, so choose k
        for the hardware. Samples go in chunks of at most ``chunk_elements`` decoder outputs to bound memory.
        """
        if k < 1:
            raise ConfigError(f"need k >= 1 importance samples, got {k}")
        x = x.reshape(x.shape[0], *self.input_shape)
        mu, logvar = self.encode_stats(x)  # (B, latent) each
        xf = x.flatten(1)  # (B, D)
        b = x.shape[0]
        per = max(1, chunk_elements // max(1, b * self.input_dim))  # samples per chunk
        log_w = []
        for start in range(0, k, per):
            log_w.append(self._log_weights(xf, mu, logvar, min(per, k - start), generator)[0])  # (s, B)
        return log_mean_exp(torch.cat(log_w), dim=0)

    def describe(self):
        return {**super().describe(), "backbone": self.backbone, "likelihood":
                "bernoulli" if self.loss_kind == "bce" else f"gaussian(std={self.obs_std})"}
