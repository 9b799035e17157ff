"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017) with a gated PixelCNN prior over its code grid.

A conv encoder maps a (C, H, W) image to an (H/4, W/4) grid of D-dimensional vectors; each is replaced by its
nearest entry of a codebook of K vectors (so an image becomes (H/4, W/4) integers: 7x7 for MNIST); a conv decoder
maps the quantised grid back to pixels. Gradients cross the quantiser straight through (the decoder's gradient
w.r.t. the quantised vectors is handed to the encoder's outputs); the encoder is pulled towards its codes by the
commitment term beta * ||z_e - sg(e)||^2; the codebook itself is **not** trained by gradients but by exponential
moving averages of the vectors assigned to each entry (the paper's appendix; Razavi et al. 2019), with Laplace
smoothing of the counts.

Under data-parallel training every worker sees different vectors: the per-batch counts and sums are all-reduced
(summed over workers, ``torch.distributed``) before the EMA step, so every worker applies the same update from
all shards. DDP's default buffer broadcast (rank 0's buffers copied to the others before each forward) would
otherwise keep the codebooks equal only by discarding every other worker's statistics.

Training is two stages of one run: ``vq`` (encoder + decoder + EMA codebook) then ``prior``, a gated PixelCNN
(``raeflow.models.pixel_layers``) over the frozen encoder's code grid, trained by maximum likelihood. ``sample``
draws a grid one code at a time (49 prior passes on MNIST) and decodes it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.capabilities import capabilities_of
from raeflow.models.base import Phase, Stage, TrainPlan, reconstruction_loss
from raeflow.models.pixel_layers import GatedPixelCNN
from raeflow.registry import register_model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(t: torch.Tensor) -> None:
    """Rank 0's values everywhere (in place): one worker's random choice becomes every worker's."""
    if _distributed():
        dist.broadcast(t, src=0)


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over the data-parallel workers (no-op in a single process)."""
    if _distributed():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()


class EMAQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser whose codebook follows EMAs of the vectors assigned to each entry.

    Buffers (all saved): ``codebook`` (K, D); ``ema_count`` (K,) and ``ema_sum`` (K, D), the running assignment
    counts and vector sums, started as if each entry had been assigned its own initial value once (so an
    unused entry stays where it is until its count decays, instead of collapsing to zero); ``vectors_seen``, the
    number of vectors that have updated the codebook, summed over workers (float64: exact to 2^53);
    ``initialised`` (0 until the first update).

    Two guards against the usual codebook collapse (a freshly initialised encoder's outputs all lie nearest one
    random entry, and only that entry ever moves): the first update places every entry on one of the batch's
    encoder outputs, and each update restarts "dead" entries (EMA share of assignments under
    ``dead_threshold`` times a uniform share, i.e. unused for hundreds of steps) on random vectors of the batch.
    Both choices are rank 0's, broadcast, so every worker keeps the same codebook.

    ``forward`` only quantises (straight-through); :meth:`update` is the EMA step, called by the model in
    training mode, so a classifier fine-tuned on ``encoder_modules()`` never moves the codebook.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5,
                 dead_threshold: float = 0.01):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"need codebook_size >= 2 and embedding_dim >= 1; got {codebook_size}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {decay}")
        self.k, self.dim, self.decay, self.eps = int(codebook_size), int(dim), float(decay), float(eps)
        init = torch.randn(self.k, self.dim)
        self.register_buffer("codebook", init.clone())  # (K, D)
        self.register_buffer("ema_count", torch.ones(self.k))  # (K,)
        self.register_buffer("ema_sum", init.clone())  # (K, D)
        self.register_buffer("vectors_seen", torch.zeros((), dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros(()))
        self.dead_threshold = float(dead_threshold)

    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of ``flat`` drawn at random (with replacement when it has fewer), rank 0's draw everywhere."""
        pick = torch.randint(len(flat), (n,), device=flat.device) if len(flat) < n else \
            torch.randperm(len(flat), device=flat.device)[:n]
        rows = flat[pick].contiguous()
        _broadcast_from_rank0(rows)
        return rows

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest codebook entry (squared Euclidean distance)."""
        e = self.codebook
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ e.T + (e * e).sum(1)  # (N, K)
        return d2.argmin(1)

    def forward(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w) quantised, with the straight-through gradient to ``z_e``."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B*h*w, D)
        z_q = self.codebook[self.indices(flat)].view(z_e.shape[0], z_e.shape[2], z_e.shape[3], self.dim)
        z_q = z_q.permute(0, 3, 1, 2)
        return z_e + (z_q - z_e).detach()

    @torch.no_grad()
    def update(self, flat: torch.Tensor, idx: torch.Tensor) -> int:
        """One EMA step from this batch's vectors ``flat`` (N, D) and their assignments ``idx`` (N,), summed
        over every worker first so each applies the identical update. Returns how many entries it restarted."""
        if not bool(self.initialised):  # data-dependent start: every entry on some encoder output
            rows = self._random_rows(flat, self.k)
            self.codebook.copy_(rows)
            self.ema_sum.copy_(rows * self.ema_count.unsqueeze(1))
            self.initialised.fill_(1)
            idx = self.indices(flat)
        onehot = F.one_hot(idx, self.k).to(flat.dtype)  # (N, K)
        count = onehot.sum(0)  # (K,)
        total = onehot.T @ flat  # (K, D)
        seen = torch.tensor([float(len(flat))], dtype=flat.dtype, device=flat.device)
        _all_reduce_sum(count, total, seen)
        g = self.decay
        self.ema_count.mul_(g).add_(count, alpha=1 - g)
        self.ema_sum.mul_(g).add_(total, alpha=1 - g)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.k * self.eps) * n  # Laplace: no division by 0
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.vectors_seen.add_(seen.to(torch.float64).squeeze())
        if self.dead_threshold > 0:  # the EMA counts are identical on every worker: all agree on `dead`
            dead = self.ema_count / n < self.dead_threshold / self.k  # (K,)
            if bool(dead.any()):
                rows = self._random_rows(flat, int(dead.sum()))
                share = n / self.k  # restarted as a uniform-share entry at that vector
                self.codebook[dead] = rows
                self.ema_count[dead] = share
                self.ema_sum[dead] = rows * share
                return int(dead.sum())
        return 0


def perplexity(idx: torch.Tensor, k: int) -> torch.Tensor:
    """exp(entropy) of the codes' empirical distribution: K when all are used equally, 1 for a single one."""
    p = torch.bincount(idx.reshape(-1), minlength=k).double()
    p = p / p.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


@register_model("vqvae", "VQ-VAE: a grid of discrete codes (EMA codebook) and a gated PixelCNN prior over it "
                         "(van den Oord et al. 2017)")
class VQVAE(nn.Module):
    """VQ-VAE + PixelCNN prior. Stages ``vq`` (loss: reconstruction + beta * commitment; EMA codebook) and
    ``prior`` (encoder, decoder and codebook frozen; loss: the prior's NLL of the code grid, nats per image).

    ``encode(x)`` gives the quantised grid flattened, (B, D * h * w), so ``latent_dim = D * h * w``;
    ``encode_indices(x)`` the codes themselves, (B, h, w) int64. The defaults are the tests' size;
    ``configs/mnist-vqvae.yaml`` holds the measured recipe. Selection: the prior's validation NLL.
    """

    capabilities = frozenset({cap.ENCODE, cap.RECONSTRUCT, cap.DISCRETE_CODES, cap.GENERATE, cap.AUTOREGRESSIVE})
    selection_metric = "val_prior_nll"
    corruption = None  # takes no input corruption

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), channels: int = 32, embedding_dim: int = 8,
                 codebook_size: int = 32, beta: float = 0.25, ema_decay: float = 0.99, dead_threshold: float = 0.01,
                 loss: str = "bce",
                 prior_channels: int = 16, prior_layers: int = 3, prior_kernel_size: int = 3):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"vqvae models images (C, H, W); got input_shape {list(self.input_shape)}")
        c, h, w = self.input_shape
        if h % 4 or w % 4:
            raise ValueError(f"vqvae downsamples by 4: height and width must be multiples of 4; got {h}x{w}")
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss must be 'bce' or 'mse' (pixels in [0, 1]); got {loss!r}")
        self.loss_kind, self.beta = loss, float(beta)
        self.grid = (h // 4, w // 4)  # (h, w) of the code grid
        self.embedding_dim, self.codebook_size = int(embedding_dim), int(codebook_size)
        self.latent_dim = self.embedding_dim * self.grid[0] * self.grid[1]
        ch = int(channels)
        self.encoder = nn.Sequential(  # (B, C, H, W) -> (B, D, H/4, W/4)
            nn.Conv2d(c, ch, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(ch, ch, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(ch, self.embedding_dim, 1))
        self.quantizer = EMAQuantizer(codebook_size, embedding_dim, ema_decay, dead_threshold=dead_threshold)
        self.decoder = nn.Sequential(  # (B, D, H/4, W/4) -> (B, C, H, W) logits
            nn.Conv2d(self.embedding_dim, ch, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(ch, c, 4, 2, 1))
        # The prior embeds each code (a learnt vector per index: a 1x1 conv of its one-hot map, cheaper than
        # convolving K one-hot channels) and returns K logits per position.
        self.prior_embedding = nn.Embedding(self.codebook_size, int(prior_channels))
        self.prior = GatedPixelCNN(int(prior_channels), self.codebook_size, prior_channels, prior_layers,
                                   prior_kernel_size)

    # ----------------------------------------------------------------------------------------- interface
    @property
    def input_dim(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    @property
    def sample_steps(self) -> int:
        """Sequential prior passes one ``sample(n)`` call takes (h * w, whatever n), plus one decode."""
        return self.grid[0] * self.grid[1]

    def _z_e(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(-1, *self.input_shape))  # (B, D, h, w)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, h, w) int64 codebook indices."""
        z = self._z_e(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        return self.quantizer.indices(flat).view(z.shape[0], *self.grid)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, D * h * w): the quantised vectors, channel-major (as ``decode`` reads them)."""
        return self.quantizer(self._z_e(x)).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D * h * w) quantised (or any) vectors -> (B, *input_shape) in [0, 1]."""
        raw = self.decoder(z.reshape(-1, self.embedding_dim, *self.grid))
        return torch.sigmoid(raw).reshape(z.shape[0], *self.input_shape)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codebook indices -> (B, *input_shape) images."""
        z = self.quantizer.codebook[idx].permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decode(z.flatten(1))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Decode points on the line between the quantised grids of a and b (the decoder takes any vectors)."""
        za, zb = self.encode(a.reshape(1, *self.input_shape)), self.encode(b.reshape(1, *self.input_shape))
        t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(1)  # (steps, 1)
        return self.decode(za * (1 - t) + zb * t)

    def encoder_modules(self) -> list[nn.Module]:
        """Encoder then quantiser (which only quantises there: the codebook moves only in ``forward``)."""
        return [self.encoder, self.quantizer]

    def prior_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, K, h, w): logits of each code given the codes before it in raster order."""
        return self.prior(self.prior_embedding(idx).permute(0, 3, 1, 2))  # (B, C, h, w) in

    def prior_log_prob(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B,) log p(codes) under the prior, in nats."""
        return -F.cross_entropy(self.prior_logits(idx), idx, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n code grids (n, h, w) drawn one position at a time (h * w prior passes, each on the rows so far)."""
        h, w = self.grid
        dev = self.quantizer.codebook.device
        idx = torch.zeros(n, h, w, dtype=torch.long, device=dev)
        for i in range(h):
            for j in range(w):
                logits = self.prior_logits(idx[:, : i + 1])[:, :, i, j]  # (n, K)
                idx[:, i, j] = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
        return idx

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images, (n, *input_shape): a code grid from the prior, decoded."""
        return self.decode_indices(self.sample_indices(n, generator))

    # ------------------------------------------------------------------------------------------ training
    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        """The trainer's stage hook (see ``Autoencoder.enter_stage``): the stages' ``frozen`` lists do the work."""

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("vq", plan.epochs_for("vq"), phases=[Phase("main", modules=("encoder", "decoder"))]),
                Stage("prior", plan.epochs_for("prior"), phases=[Phase("main", modules=("prior_embedding", "prior"))],
                      frozen=("encoder", "decoder"))]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "vq",
                phase: str = "main") -> dict[str, torch.Tensor]:
        x = x.reshape(-1, *self.input_shape)
        if stage == "prior":
            with torch.no_grad():  # the encoder is frozen: its codes are the prior's data
                idx = self.encode_indices(x)
            nll = -self.prior_log_prob(idx).mean()
            return {"loss": nll, "prior_nll": nll}
        if stage != "vq":
            raise ValueError(f"vqvae has stages 'vq' and 'prior', not {stage!r}")
        z_e = self._z_e(x)  # (B, D, h, w)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)  # (B*h*w, D)
        idx = self.quantizer.indices(flat.detach())
        z_q = self.quantizer.codebook[idx].view(z_e.shape[0], *self.grid, self.embedding_dim).permute(0, 3, 1, 2)
        commit = ((z_e - z_q) ** 2).flatten(1).sum(1).mean()  # z_q holds no gradient: codebook is a buffer
        recon = reconstruction_loss(self.decoder(z_e + (z_q - z_e).detach()), x, self.loss_kind)
        restarts = 0
        if self.training:  # after the assignment it used, as in the paper's EMA update
            restarts = self.quantizer.update(flat.detach(), idx)
        # Codebook usage, logged every epoch: perplexity of the batch's codes (K when all are used equally),
        # entries no vector of the batch chose, entries restarted at this step.
        ppl = perplexity(idx, self.codebook_size).to(recon)
        dead = torch.tensor(float(self.codebook_size - idx.unique().numel())).to(recon)
        return {"loss": recon + self.beta * commit, "recon": recon, "commit": commit, "perplexity": ppl,
                "dead_codes": dead, "restarts": torch.tensor(float(restarts)).to(recon)}

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "input_shape": list(self.input_shape), "latent_dim": self.latent_dim,
                "code_grid": list(self.grid), "codebook_size": self.codebook_size,
                "capabilities": sorted(capabilities_of(self)),
                "parameters": sum(p.numel() for p in self.parameters())}
