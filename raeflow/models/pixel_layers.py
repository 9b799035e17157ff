"""Gated PixelCNN layers (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"),
shared by ``pixelcnn`` (Bernoulli pixels) and ``vqvae``'s prior (categorical codes). Not a variant: no
``@register_model`` here.

Causality by shifted, one-sided padding instead of masked kernels, which is what removes the original
PixelCNN's blind spot:

* the **vertical stack** convolves a ``(k//2 + 1, k)`` kernel over rows ``i - k//2 .. i`` (padding on top only),
  so its output at row ``i`` sees input rows ``<= i``, every column within reach;
* it feeds the **horizontal stack** only after a one-row down shift, so the horizontal stack at ``(i, j)`` gets
  vertical features of rows ``< i`` only;
* the **horizontal stack** convolves a ``(1, k//2 + 1)`` kernel over columns ``j - k//2 .. j`` (padding on the
  left only); in the first layer the kernel's last column (the pixel itself) is masked to zero ("mask A"),
  later layers may see position ``j`` because their input there already excludes pixel ``(i, j)``.

So the output at ``(i, j)`` depends exactly on the pixels before it in raster order (within the receptive
field: ``layers * (k//2)`` rows up, columns left, and columns right through the vertical stack). Nothing reads
rows below the current one, which is also why :meth:`GatedPixelCNN.forward` on the rows ``0..r`` of an image
gives the same outputs for those rows as on the whole image: samplers only compute the rows they need.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gate(h: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves: (B, 2C, H, W) -> (B, C, H, W)."""
    a, b = h.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def down_shift(h: torch.Tensor) -> torch.Tensor:
    """Row i gets row i - 1 (row 0 gets zeros): what the vertical stack hands the horizontal one."""
    return F.pad(h, (0, 0, 1, 0))[:, :, :-1, :]


class GatedLayer(nn.Module):
    """One gated layer with both stacks; ``first`` masks the pixel itself in the horizontal kernel (mask A)
    and drops the horizontal residual (the input has a different width and must not leak the pixel)."""

    def __init__(self, in_ch: int, ch: int, kernel: int, first: bool):
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3; got {kernel}")
        self.k = kernel
        self.first = first
        self.v_conv = nn.Conv2d(in_ch, 2 * ch, (kernel // 2 + 1, kernel))  # padded on top, left and right
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_conv = nn.Conv2d(in_ch, 2 * ch, (1, kernel // 2 + 1))  # padded on the left only
        self.h_out = nn.Conv2d(ch, ch, 1)
        mask = torch.ones(1, 1, 1, kernel // 2 + 1)
        if first:
            mask[..., -1] = 0  # the pixel's own value must not predict itself
        self.register_buffer("h_mask", mask, persistent=False)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.k // 2
        v_feat = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, H, W): rows <= i
        h_feat = F.conv2d(F.pad(h, (p, 0, 0, 0)), self.h_conv.weight * self.h_mask, self.h_conv.bias)
        h_feat = h_feat + self.v_to_h(down_shift(v_feat))  # vertical context from rows < i only
        h_new = self.h_out(gate(h_feat))
        if not self.first:
            h_new = h_new + h
        return gate(v_feat), h_new


class GatedPixelCNN(nn.Module):
    """``layers`` gated layers then a 1x1 ReLU head (the first layer may take a wider ``first_kernel_size``: on
    a 1-channel input it costs little and widens the receptive field, as the paper's 7x7 first layer does): (B, in_ch, H, W) -> (B, out_ch, H, W) logits, where the
    logits at (i, j) depend only on the input at positions before (i, j) in raster order."""

    def __init__(self, in_ch: int, out_ch: int, channels: int = 32, layers: int = 6, kernel_size: int = 3,
                 head_channels: int | None = None, first_kernel_size: int | None = None):
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"layers and channels must be positive; got layers={layers}, channels={channels}")
        self.layers = nn.ModuleList(
            [GatedLayer(in_ch, channels, int(first_kernel_size or kernel_size), first=True)]
            + [GatedLayer(channels, channels, kernel_size, first=False) for _ in range(layers - 1)])
        hc = int(head_channels or channels)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hc, 1), nn.ReLU(), nn.Conv2d(hc, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)
