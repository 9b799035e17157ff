"""PCA, the linear baseline, fitted in closed form from accumulated first and second moments.

Training makes one pass over the data summing ``n``, ``Σx`` and ``Σxxᵀ`` (float64), so data-parallel workers
can each accumulate their shard and all-reduce the sums: the fit is then identical to a single-process fit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from raeflow.models.base import Autoencoder, Stage, TrainPlan
from raeflow.registry import register_model
from raeflow.errors import ConfigError


@register_model("pca", "principal component analysis, fitted in closed form (the linear baseline)")
class PCA(Autoencoder):
    """Projection onto the top ``latent_dim`` principal directions; decode maps back and adds the mean."""

    selection_metric = "val_loss"

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 30):
        # mse_linear: PCA reconstructions are unbounded affine maps; its loss is squared error per example.
        super().__init__(input_shape, latent_dim, loss="mse_linear")
        d = self.input_dim
        if not 0 < latent_dim <= d:
            raise ConfigError(f"latent_dim must be in 1..{d}, got {latent_dim}")
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(latent_dim, d))  # (k, D), rows orthonormal
        self.register_buffer("explained_variance", torch.zeros(latent_dim))
        # Accumulators (float64): saved with checkpoints so a fit can resume, zero once finalized.
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum_x", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("sum_xx", torch.zeros(d, d, dtype=torch.float64))

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("fit", epochs=1, phases=[], closed_form=True)]

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor) -> None:
        x = x.flatten(1).to(torch.float64)  # (B, D)
        self.n_seen += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_xx += x.T @ x

    @torch.no_grad()
    def finalize(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Turn the accumulated moments into components; ``all_reduce`` sums them across workers first."""
        if all_reduce is not None:
            for t in (self.n_seen, self.sum_x, self.sum_xx):
                all_reduce(t)
        n = self.n_seen.item()
        if n < 2:
            raise ConfigError("PCA needs at least 2 examples to fit")
        mean = self.sum_x / n
        cov = (self.sum_xx - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(evals, descending=True)[: self.latent_dim]
        comps = evecs[:, order].T  # (k, D)
        # Deterministic sign (as scikit-learn's svd_flip): the largest-magnitude entry of each row is positive.
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.components.copy_((comps * signs).float())
        self.explained_variance.copy_(evals[order].float())
        self.mean.copy_(mean.float())
        for t in (self.n_seen, self.sum_x, self.sum_xx):
            t.zero_()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components.T  # (B, k)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components + self.mean  # (B, D)

    def forward(self, x, y=None, *, stage="fit", phase="main"):
        raw = self._decode_raw(self._encode(x))
        recon = ((raw - x.flatten(1)) ** 2).sum(1).mean()
        return {"loss": recon, "recon": recon}
