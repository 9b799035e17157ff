"""Adversarial autoencoder (Makhzani et al. 2015): an AE (deterministic, or with a fixed-variance Gaussian
posterior) whose codes are made to look like prior draws by a discriminator, instead of by a KL term as in the VAE.

One stage, three phases per batch, each with its own optimiser (``Phase.modules``):
``recon`` (encoder + decoder minimise the reconstruction loss), ``disc`` (the discriminator learns to tell prior
draws, label 1, from codes, label 0; codes detached) and ``gen`` (the encoder learns to make the discriminator
call its codes prior draws: the non-saturating GAN loss).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.base import Autoencoder, Phase, Stage, TrainPlan, mlp, reconstruction_loss
from raeflow.registry import register_model
from raeflow.errors import ConfigError

PRIORS = ("gaussian", "mixture")


@register_model("aae", "adversarial autoencoder: a discriminator matches the codes to a Gaussian or "
                       "mixture prior (Makhzani et al. 2015)")
class AdversarialAE(Autoencoder):
    """AAE; terms per phase: ``recon``; ``disc`` and ``disc_acc``; ``gen``. Selection: validation reconstruction.

    Defaults follow the paper's MNIST model: encoder, decoder and discriminator with two ReLU layers of 1000, an
    8-D code. ``prior="gaussian"``: N(0, I). ``prior="mixture"``: ``n_components`` Gaussians of std
    ``mixture_std`` whose means sit on a circle of radius ``mixture_radius`` in the first two code dimensions
    (0 in the others), the paper's 10-Gaussian mixture when n_components=10.
    Corruption (if configured) applies to the reconstruction phase's input only.
    ``posterior_std``: 0 (default, the paper's deterministic encoder) or the std of a Gaussian posterior
    q(z|x) = N(E(x), posterior_std^2 I) with a fixed variance (the paper's "Gaussian posterior" choice): in training
    every phase samples the code, so the decoder learns to decode the neighbourhood of each code (where prior draws
    that miss every training code land) and the discriminator matches the sampled codes, the aggregated posterior, to
    the prior. ``encode`` returns the mean.
    """

    capabilities = frozenset({cap.ENCODE, cap.RECONSTRUCT, cap.GENERATE})
    # The trainer prefixes a multi-phase stage's terms with the phase: the `recon` term of phase `recon`.
    selection_metric = "val_recon_recon"

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 8,
                 hidden: Sequence[int] = (1000, 1000), activation: str = "relu", loss: str = "bce",
                 disc_hidden: Sequence[int] = (1000, 1000), prior: str = "gaussian", n_components: int = 10,
                 mixture_radius: float = 4.0, mixture_std: float = 0.5, disc_lr_scale: float = 1.0,
                 gen_lr_scale: float = 1.0, posterior_std: float = 0.0, corruption: dict | None = None):
        super().__init__(input_shape, latent_dim, loss, corruption)
        if prior not in PRIORS:
            raise ConfigError(f"unknown prior {prior!r}; use one of {PRIORS}")
        if prior == "mixture" and (latent_dim < 2 or n_components < 1 or mixture_std <= 0):
            raise ConfigError("prior='mixture' needs latent_dim >= 2, n_components >= 1 and mixture_std > 0; got "
                             f"latent_dim={latent_dim}, n_components={n_components}, mixture_std={mixture_std}")
        if posterior_std < 0:
            raise ConfigError(f"posterior_std must be >= 0 (0: a deterministic encoder), got {posterior_std}")
        self.prior, self.mixture_std, self.posterior_std = prior, float(mixture_std), float(posterior_std)
        self.disc_lr_scale, self.gen_lr_scale = float(disc_lr_scale), float(gen_lr_scale)
        sizes = [self.input_dim, *hidden, latent_dim]
        self.encoder = mlp(sizes, activation)  # (B, D) -> (B, k), linear code: the prior decides its range
        self.decoder = mlp(list(reversed(sizes)), activation)  # (B, k) -> (B, D) pre-activation
        self.discriminator = mlp([latent_dim, *disc_hidden, 1], activation)  # (B, k) -> (B, 1) logit "prior draw"
        # The mixture's means are a function of the config, not learnt: a buffer that is not saved.
        angles = 2 * math.pi * torch.arange(max(n_components, 1)) / max(n_components, 1)
        means = torch.zeros(max(n_components, 1), latent_dim)  # (K, k)
        if prior == "mixture":
            means[:, 0], means[:, 1] = mixture_radius * torch.cos(angles), mixture_radius * torch.sin(angles)
        self.register_buffer("mixture_means", means, persistent=False)

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("train", plan.epochs, phases=[
            Phase("recon", modules=("encoder", "decoder")),
            Phase("disc", modules=("discriminator",), lr_scale=self.disc_lr_scale),
            Phase("gen", modules=("encoder",), lr_scale=self.gen_lr_scale),
        ])]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def _sampled_code(self, x: torch.Tensor) -> torch.Tensor:
        """A draw of q(z|x) in training, its mean otherwise: (B, k)."""
        z = self._encode(x)
        if self.training and self.posterior_std > 0:
            z = z + self.posterior_std * torch.randn_like(z)
        return z

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of the prior: (n, latent_dim)."""
        dev = self.mixture_means.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=dev)
        if self.prior == "gaussian":
            return z
        comp = torch.randint(len(self.mixture_means), (n,), generator=generator, device=dev)
        return self.mixture_means[comp] + self.mixture_std * z

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "recon") -> dict[str, torch.Tensor]:
        if phase == "recon":
            recon = reconstruction_loss(self._decode_raw(self._sampled_code(self.corrupt(x))), x, self.loss_kind)
            return {"loss": recon, "recon": recon}
        if phase == "disc":
            with torch.no_grad():  # codes are the "fake" examples here: the encoder is not trained in this phase
                z = self._sampled_code(x)
            real = self.discriminator(self.sample_prior(len(x)).to(z.dtype))  # (B, 1)
            fake = self.discriminator(z)  # (B, 1)
            logits = torch.cat([real, fake]).squeeze(1)  # (2B,)
            target = torch.cat([torch.ones(len(x)), torch.zeros(len(x))]).to(logits)
            disc = F.binary_cross_entropy_with_logits(logits, target)
            acc = ((logits > 0).to(target) == target).float().mean()
            return {"loss": disc, "disc": disc, "disc_acc": acc}
        if phase == "gen":
            # Non-saturating generator loss: -log D(z), z the (sampled) code of x. The discriminator gets gradients here too, but only the
            # gen phase's optimiser (the encoder's) steps, and the disc phase zeroes them before its backward.
            logits = self.discriminator(self._sampled_code(x)).squeeze(1)
            gen = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            return {"loss": gen, "gen": gen}
        raise ConfigError(f"aae has phases 'recon', 'disc' and 'gen', not {phase!r}")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n prior draws: (n, *input_shape)."""
        return self.decode(self.sample_prior(n, generator))
