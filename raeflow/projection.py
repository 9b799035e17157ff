"""2-D views of codes for the latent scatter: PCA (linear, fast) and t-SNE (the lecture notes' tool for codes).

t-SNE follows the usual recipe: PCA to 50 dimensions first (denoises and makes the neighbour search cheap), then
openTSNE's FFT-accelerated t-SNE, seeded, so the same codes and seed give the same picture. openTSNE over
scikit-learn's Barnes-Hut: measured on 10,000 MNIST codes (see :func:`tsne_2d` and the README's t-SNE line).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from raeflow.errors import InputError

PROJECTIONS = ("pca", "tsne")


def pca_2d(z: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(z).astype(np.float32)


def tsne_2d(z: np.ndarray, seed: int = 0, *, perplexity: float = 30.0, n_jobs: int = 1,
            engine: str = "opentsne") -> np.ndarray:
    """(N, k) codes -> (N, 2): PCA to min(50, k, N) dimensions, then t-SNE. ``engine``: opentsne | sklearn."""
    z = np.asarray(z, np.float32)
    if len(z) < 4:
        raise InputError(f"t-SNE needs at least 4 points, got {len(z)}")
    perplexity = min(perplexity, (len(z) - 1) / 3)  # both libraries refuse a perplexity this large
    d = min(50, z.shape[1], len(z))
    if z.shape[1] > d:
        from sklearn.decomposition import PCA

        z = PCA(d, random_state=seed).fit_transform(z).astype(np.float32)
    if engine == "opentsne":
        from openTSNE import TSNE

        emb = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=n_jobs,
                   initialization="pca", verbose=False).fit(z.astype(np.float64))
        return np.asarray(emb, np.float32)
    if engine == "sklearn":
        from sklearn.manifold import TSNE as SkTSNE

        return SkTSNE(2, perplexity=perplexity, random_state=seed, init="pca", n_jobs=n_jobs).fit_transform(z) \
            .astype(np.float32)
    raise InputError(f"unknown t-SNE engine {engine!r}; use opentsne or sklearn")


def extra_projections(run, model, sample, log=print) -> list[Path]:
    """The scatters beyond plots.py's PCA view that the run's config asks for (``plots.projections``): today
    t-SNE, written to ``plots/latent_tsne.png``. Reads the choice from ``run.yaml``; returns the files made."""
    import torch

    from raeflow.models import capabilities as cap
    from raeflow.models.capabilities import capabilities_of

    cfg = run.config() if run.run_yaml.is_file() else None
    wanted = list(cfg.plots.projections) if cfg is not None else ["pca"]
    unknown = set(wanted) - set(PROJECTIONS)
    if unknown:
        raise InputError(f"plots.projections: unknown {sorted(unknown)}; use {list(PROJECTIONS)}")
    if "tsne" not in wanted or cap.ENCODE not in capabilities_of(model):
        return []
    n = int(cfg.plots.scatter_n)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(sample.x[:n])).numpy()  # (n, latent_dim)
    xy = tsne_2d(z, seed=cfg.train.seed) if z.shape[1] > 2 else z
    path = run.plots / "latent_tsne.png"
    scatter(xy, None if sample.y is None else sample.y[:n], path,
            f"latent space (t-SNE of code, {len(z):,} examples)" if z.shape[1] > 2 else "latent space (code)")
    return [path]


def scatter(xy: np.ndarray, y: np.ndarray | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=4)
    if y is not None:
        fig.colorbar(sc, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
