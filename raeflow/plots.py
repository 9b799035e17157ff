"""The run's PNG plots: loss curve, reconstruction grid, 2-D latent scatter, decoded latent grid."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: runs on headless machines and inside Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    """Rows: input, corrupted input (when the model trains on corrupted inputs), reconstruction."""
    xs = torch.from_numpy(x[:n])
    rows = [("input", xs)]
    if getattr(model, "corruption", None) is not None:
        g = torch.Generator().manual_seed(0)
        noisy = model.corruption(xs, generator=g)
        rows.append(("noisy", noisy))
        rows.append(("denoised", model.denoise(noisy)))
    else:
        rows.append(("output", model.reconstruct(xs)))
    fig, axes = plt.subplots(len(rows), n, figsize=(n, len(rows) + 0.3))
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
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(z[:, 0], z[:, 1], c=None if y is None else y[:n], cmap="tab10", s=4)
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


def plot_run(run, model, data, log: Callable[[str], None] = print) -> list[Path]:
    """Every plot that applies to ``model`` and ``data``, into ``run.plots``."""
    run.plots.mkdir(exist_ok=True)
    made = []
    rows = run.read_metrics()
    if rows:
        loss_curve(rows, run.plots / "loss.png")
        made.append(run.plots / "loss.png")
    sample = data.val if data.val is not None else data.train
    model.eval()
    if _is_image(model.input_shape) and hasattr(model, "reconstruct"):  # classifiers do not reconstruct
        reconstruction_grid(model, sample.x, run.plots / "reconstructions.png")
        made.append(run.plots / "reconstructions.png")
        if "generate" in capabilities_of(model) and model.latent_dim == 2:
            latent_grid(model, run.plots / "latent_grid.png")
            made.append(run.plots / "latent_grid.png")
    latent_scatter(model, sample.x, sample.y, run.plots / "latent.png")
    made.append(run.plots / "latent.png")
    log(f"plots: {', '.join(p.name for p in made)}")
    return made
