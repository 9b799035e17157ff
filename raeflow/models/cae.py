"""Convolutional autoencoder (Masci et al. 2011): conv + ReLU + max-pool blocks, mirrored by unpool + deconv.

Unpooling needs to know where each pooled value came from. When the model reconstructs an input it has the
encoder's max-pool indices, so ``nn.MaxUnpool2d`` puts every value back at its argmax position (zeros
elsewhere). A bare code (``decode(z)``: generation, interpolation) has no indices, so it is upsampled by copying
each value into its 2x2 window ("nearest"). ``unpool`` chooses which of the two the model is *trained* with:
``"max"`` (the paper's) trains and reconstructs with indices and decodes bare codes with copying, an
approximation; ``"nearest"`` uses copying everywhere, so ``decode(z)`` is exactly what was trained.

Pooling halves the height and width (flooring odd sizes: 28 -> 14 -> 7 -> 3); the decoder restores the exact
pre-pool size of every level, so odd sizes round-trip. An 8x8 input takes two blocks (8 -> 4 -> 2) or three.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models.base import Autoencoder, reconstruction_loss
from raeflow.registry import register_model
from raeflow.errors import ConfigError

UNPOOL = ("max", "nearest")
Size2 = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv (size-preserving padding) + ReLU + 2x2 max-pool. ``forward`` returns only the pooled map, so a
    classifier can stack blocks in a plain loop; the autoencoder calls :meth:`pooled_with_indices`."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def pooled_with_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, c_in, H, W) -> pooled (B, c_out, H//2, W//2) and the argmax indices MaxUnpool2d needs."""
        return self.pool(F.relu(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled_with_indices(x)[0]


def unpool(h: torch.Tensor, size: Size2, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Undo a 2x2 max-pool to spatial ``size``: values back at their argmax positions (zeros elsewhere) when
    ``indices`` are given, else each value copied into its whole 2x2 window (nearest-neighbour upsampling).

    ``size`` is the pre-pool (H, W); for odd sizes the last row/column, which pooling dropped, is zero (max) or
    a copy of its neighbour (nearest).
    """
    if indices is not None:
        return F.max_unpool2d(h, indices, 2, output_size=size)
    up = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, C, 2h, 2w)
    if up.shape[-2:] != size:  # odd pre-pool size: pad by replicating the last row/column
        up = F.pad(up, (0, size[1] - up.shape[-1], 0, size[0] - up.shape[-2]), mode="replicate")
    return up


@register_model("cae", "convolutional autoencoder: conv/max-pool encoder, unpool/deconv decoder (Masci et al. 2011)")
class ConvAE(Autoencoder):
    """Encoder ``[conv k x k -> ReLU -> max-pool 2] x len(channels)`` then, when ``latent_dim`` is given, a dense
    bottleneck; the decoder mirrors it with unpooling and transposed convolutions (stride 1, same padding).

    ``latent_dim=None`` keeps no bottleneck: the code is the last pooled feature map, flattened, and
    ``latent_dim`` becomes its size C*h*w. Corruption (a denoising CAE) is the base class's ``corruption``.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int | None = None,
                 channels: Sequence[int] = (32, 64), kernel_size: int = 3, unpool: str = "max",
                 loss: str = "bce", corruption: dict | None = None):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise ConfigError(f"cae needs image input (C, H, W); got input_shape {list(shape)}")
        if unpool not in UNPOOL:
            raise ConfigError(f"unknown unpool {unpool!r}; use one of {UNPOOL}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (3, 5, ...) so padding keeps the size; got {kernel_size}")
        if not channels or any(int(c) < 1 for c in channels):
            raise ConfigError(f"channels must be a non-empty list of positive widths; got {list(channels)}")
        # Spatial size before each pool, known at build time so the decoder can restore odd sizes exactly.
        sizes: list[Size2] = [shape[1:]]
        for _ in channels:
            h, w = sizes[-1]
            if h < 2 or w < 2:
                raise ConfigError(f"cae: {len(channels)} pooling blocks are too many for a {shape[1]}x{shape[2]} "
                                 f"input (it is {h}x{w} before block {len(sizes)}); use fewer channels entries")
            sizes.append((h // 2, w // 2))
        feat = int(channels[-1]) * sizes[-1][0] * sizes[-1][1]  # C*h*w of the last pooled map
        if latent_dim is not None and int(latent_dim) < 1:
            raise ConfigError(f"latent_dim must be positive (or null for no bottleneck); got {latent_dim}")
        super().__init__(shape, feat if latent_dim is None else int(latent_dim), loss, corruption)
        self.unpool_mode = unpool
        self.pre_pool_sizes = sizes[:-1]  # [(H, W), (H/2, W/2), ...]: the size each unpool restores
        self.feature_shape = (int(channels[-1]), *sizes[-1])  # (C, h, w) of the last pooled map
        widths = [shape[0], *(int(c) for c in channels)]
        self.blocks = nn.ModuleList(ConvBlock(a, b, kernel_size) for a, b in zip(widths[:-1], widths[1:]))
        # Decoder, deepest level first: deconv i maps widths[i+1] -> widths[i] (the last one to the image).
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(b, a, kernel_size, padding=kernel_size // 2)
                                     for a, b in reversed(list(zip(widths[:-1], widths[1:]))))
        if latent_dim is not None:
            self.bottleneck = nn.Linear(feat, self.latent_dim)  # (B, C*h*w) -> (B, latent)
            self.unbottleneck = nn.Linear(self.latent_dim, feat)  # (B, latent) -> (B, C*h*w)
        else:
            self.bottleneck = self.unbottleneck = None

    # ------------------------------------------------------------------------------------------ encoder
    def encode_with_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> code (B, latent_dim) and each block's max-pool indices (shallowest first)."""
        h = x.reshape(x.shape[0], *self.input_shape)
        indices = []
        for block in self.blocks:
            h, idx = block.pooled_with_indices(h)
            indices.append(idx)
        z = h.flatten(1)  # (B, C*h*w)
        if self.bottleneck is not None:
            z = self.bottleneck(z)  # (B, latent)
        return z, indices

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_indices(x)[0]

    def encoder_modules(self) -> list[nn.Module]:
        # Blocks take (B, C, H, W); a classifier flattens before the dense bottleneck (see models/classifier.py).
        return [*self.blocks, *([self.bottleneck] if self.bottleneck is not None else [])]

    # ------------------------------------------------------------------------------------------ decoder
    def _decode_raw(self, z: torch.Tensor, indices: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, latent) -> (B, C, H, W) pre-activation. ``indices`` from :meth:`encode_with_indices` select
        max-location unpooling; without them (a bare code) every level upsamples by copying."""
        h = z
        if self.unbottleneck is not None:
            h = F.relu(self.unbottleneck(h))  # the encoder's pooled maps are post-ReLU, so non-negative
        h = h.reshape(z.shape[0], *self.feature_shape)  # (B, C, h, w)
        levels = len(self.blocks)
        for i, deconv in enumerate(self.deconvs):
            level = levels - 1 - i  # the encoder block this step undoes
            h = unpool(h, self.pre_pool_sizes[level], None if indices is None else indices[level])
            h = deconv(h)
            if i < levels - 1:
                h = F.relu(h)
        return h

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct with the unpooling the model was trained with (indices for ``unpool="max"``)."""
        z, indices = self.encode_with_indices(x)
        raw = self._decode_raw(z, indices if self.unpool_mode == "max" else None)
        return self._activate(raw).reshape(x.shape[0], *self.input_shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        z, indices = self.encode_with_indices(self.corrupt(x))
        raw = self._decode_raw(z, indices if self.unpool_mode == "max" else None)
        recon = reconstruction_loss(raw, x, self.loss_kind)
        return {"loss": recon, "recon": recon}
