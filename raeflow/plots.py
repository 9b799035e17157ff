"""The run's PNG plots: loss curve, reconstruction grid, samples, 2-D latent scatter, decoded latent grid.

Which plots a run gets is decided by the model's declared capabilities (:data:`PLOTS`), never by its variant, and
every plot draws as many examples as exist (a 6-image dataset gets 6 columns, not a crash).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: runs on headless machines and inside Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from raeflow.models import capabilities as cap  # noqa: E402
from raeflow.models.capabilities import capabilities_of  # noqa: E402


def _is_image(shape) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _show(ax, img: np.ndarray) -> None:
    img = np.clip(img, 0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.transpose(1, 2, 0))
    ax.axis("off")


def loss_curve(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key in ("train_loss", "val_loss", "train_recon_loss", "val_recon_loss", "val_error"):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else v for v in vals], marker="o", label=key)
    for a, b in zip(rows, rows[1:]):  # mark stage changes (SDAE layers, fine-tuning)
        if a["stage"] != b["stage"]:
            ax.axvline(a["epoch"] + 0.5, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (per example)")
    ax.set_yscale("symlog")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def reconstruction_grid(model, x: np.ndarray, path: Path, n: int = 10) -> None:
    """Rows: input, then for denoisers a corrupted input and its denoising, else the reconstruction."""
    xs = torch.from_numpy(x[:n])
    n = len(xs)
    rows = [("input", xs)]
    if cap.DENOISE in capabilities_of(model):
        from raeflow.models.corruption import Corruption

        # The model's own training corruption when it has one; robust models (contractive) get masking noise.
        corruption = getattr(model, "corruption", None) or Corruption("masking", 0.25)
        noisy = corruption(xs, generator=torch.Generator().manual_seed(0))
        rows.append(("noisy", noisy))
        rows.append(("denoised", model.denoise(noisy)))
    else:
        rows.append(("output", model.reconstruct(xs)))
    fig, axes = plt.subplots(len(rows), n, figsize=(max(n, 2), len(rows) + 0.3), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            _show(axes[r, c], imgs[c].reshape(model.input_shape).numpy())
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def latent_scatter(model, x: np.ndarray, y: np.ndarray | None, path: Path, n: int = 2000) -> str:
    """Codes of ``n`` examples coloured by label; codes above 2-D are projected with PCA (fast, deterministic)."""
    z = model.encode(torch.from_numpy(x[:n])).numpy()
    how = "code"
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        z = PCA(2, random_state=0).fit_transform(z)
        how = "PCA of code"
    elif z.shape[1] == 1:  # a 1-d code: spread it against the example's index so the points do not overlap
        z = np.column_stack([z[:, 0], np.arange(len(z))])
        how = "code (y: example index)"
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(z[:, 0], z[:, 1], s=4, **({} if y is None else {"c": y[:n], "cmap": "tab10"}))
    if y is not None:
        fig.colorbar(sc, ax=ax)
    ax.set_title(f"latent space ({how})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return how


@torch.no_grad()
def latent_grid(model, path: Path, n: int = 15, span: float = 3.0) -> None:
    """The decoded 2-D manifold (the VAE paper's and the seeds' figure), over [-span, span]^2 of the code."""
    t = torch.linspace(-span, span, n)
    zz = torch.stack(torch.meshgrid(t, t.flip(0), indexing="xy"), -1).reshape(-1, 2)  # (n*n, 2)
    imgs = model.decode(zz).reshape(n, n, *model.input_shape).numpy()
    c, h, w = model.input_shape
    canvas = np.zeros((c, n * h, n * w), np.float32)
    for i in range(n):
        for j in range(n):
            canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = imgs[i, j]
    fig, ax = plt.subplots(figsize=(7, 7))
    _show(ax, canvas)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def sample_grid(model, path: Path, n: int = 16, seed: int = 0) -> None:
    """``n`` samples from the model's prior (seeded), tiled."""
    imgs = model.sample(n, generator=torch.Generator().manual_seed(seed)).reshape(n, *model.input_shape).numpy()
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i < n:
            _show(ax, imgs[i])
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _image(model, caps) -> bool:
    return _is_image(model.input_shape)


#: file -> (capabilities the model must declare, a further condition, how to draw it from (model, sample, path))
PLOTS: dict[str, tuple[frozenset[str], Callable, Callable]] = {
    "reconstructions.png": (frozenset({cap.RECONSTRUCT}), _image,
                            lambda m, s, p: reconstruction_grid(m, s.x, p)),
    "samples.png": (frozenset({cap.GENERATE}), _image, lambda m, s, p: sample_grid(m, p)),
    "latent_grid.png": (frozenset({cap.GENERATE, cap.RECONSTRUCT}),
                        lambda m, c: _image(m, c) and m.latent_dim == 2, lambda m, s, p: latent_grid(m, p)),
    "latent.png": (frozenset({cap.ENCODE}), lambda m, c: True, lambda m, s, p: latent_scatter(m, s.x, s.y, p)),
}


def plots_for(model) -> list[str]:
    """The plot files a model gets, from its declared capabilities."""
    caps = capabilities_of(model)
    return [name for name, (needs, cond, _) in PLOTS.items() if needs <= caps and cond(model, caps)]


def plot_run(run, model, data, log: Callable[[str], None] = print) -> list[Path]:
    """Every plot that applies to ``model`` and ``data``, into ``run.plots``."""
    run.plots.mkdir(exist_ok=True)
    made = []
    rows = run.read_metrics()
    if rows:
        loss_curve(rows, run.plots / "loss.png")
        made.append(run.plots / "loss.png")
    sample = data.val if data.val is not None and len(data.val) else data.train
    model.eval()
    for name in plots_for(model):
        PLOTS[name][2](model, sample, run.plots / name)
        made.append(run.plots / name)
    from raeflow.projection import extra_projections  # t-SNE beside the PCA view when plots.projections asks

    made += extra_projections(run, model, sample)
    log(f"plots: {', '.join(p.name for p in made)}")
    return made
