"""The loss maths the variants share, as plain functions of tensors (no modules, no Ray), so tests can check
each one against an independent computation.

Conventions: every per-example quantity is summed over features / latent units and returned with shape (B,),
in nats; the caller averages over the batch. That keeps the VAE's terms on the same per-image scale as
``reconstruction_loss`` (summed over pixels) and as the literature's "nats per image".
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap
from raeflow.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per example, closed form (Kingma & Welling 2013, app. B).

    mu, logvar: (B, k) -> (B,). Per unit: ½(μ² + σ² − log σ² − 1).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor | float = 0.0,
                         logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim: (..., k) -> (...)."""
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) = Σ_i x_i log σ(l_i) + (1−x_i) log(1−σ(l_i)); logits, x: (..., D), broadcast -> (...).

    For x in [0, 1] that are not binary this is the usual "BCE" score, not a normalised density.
    """
    logits, x = torch.broadcast_tensors(logits, x)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def gaussian_fixed_std_log_likelihood(mean: torch.Tensor, x: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std² I) summed over the last dim: (..., D) -> (...)."""
    d = mean.shape[-1]
    sq = (x - mean).pow(2).sum(-1)  # broadcasts
    return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * LOG_2PI)


def kl_sparsity(rho: float, rho_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Σ_j KL(Bernoulli(ρ) || Bernoulli(ρ̂_j)) (Ng's sparse-autoencoder penalty); rho_hat: (k,) -> scalar.

    ``rho_hat`` are the mean activations of sigmoid units over a batch; they are clamped into (eps, 1 − eps)
    because a unit that is exactly 0 or 1 on every example makes the KL infinite.
    """
    if not 0 < rho < 1:
        raise ConfigError(f"sparsity target rho must be in (0, 1), got {rho}")
    r = rho_hat.clamp(eps, 1 - eps)
    return (rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))).sum()


def contractive_penalty_sigmoid(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """‖J_f(x)‖²_F for f(x) = sigmoid(Wx + b), in closed form (Rifai et al. 2011, eq. 4).

    J = diag(h ⊙ (1−h)) W, so ‖J‖²_F = Σ_j (h_j(1−h_j))² Σ_i W_ji².
    h: (B, k) codes; weight: (k, D) -> (B,).
    """
    return (h * (1 - h)).pow(2) @ weight.pow(2).sum(1)  # (B, k) @ (k,) -> (B,)


def jacobian_frobenius_sq(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """‖∂f(x_b)/∂x_b‖²_F for every row of a batch, by autograd; f maps (B, D) -> (B, k), x: (B, D) -> (B,).

    Exact (one reverse pass per output unit, vectorised by ``vmap``) and differentiable, so it can be a
    training loss: gradients reach the parameters that ``f`` closes over. ``f`` must treat rows independently
    (no batch norm in training mode), which is what "the Jacobian of one example" presumes anyway.
    """

    def one(xb: torch.Tensor) -> torch.Tensor:  # (D,) -> (k,)
        return f(xb.unsqueeze(0)).squeeze(0)

    jac = vmap(jacrev(one))(x)  # (B, k, D)
    return jac.pow(2).flatten(1).sum(1)


def log_mean_exp(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log((1/k) Σ exp(a)) along ``dim``, stably (the IWAE estimator's outer operation)."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])
