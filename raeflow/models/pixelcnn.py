"""Gated PixelCNN on binarised images (van den Oord et al. 2016): p(x) = prod_i p(x_i | x_<i), each pixel a
Bernoulli whose logit a masked network computes from the pixels before it in raster order.

The lecture's other half of the VAE picture (PixelRNN): fluent samples and an exact likelihood, but no code to
steer. So this model declares GENERATE, LIKELIHOOD and AUTOREGRESSIVE, and neither ENCODE nor RECONSTRUCT: it is
a plain ``nn.Module`` with the methods those capabilities promise, not an :class:`Autoencoder`.

Training reads grey-level images in [0, 1] and binarises them: ``binarize="dynamic"`` draws a fresh
x ~ Bernoulli(pixel) every batch in training mode (a regulariser), while evaluation mode binarises with a fixed
seed so validation losses are comparable between epochs. :meth:`log_likelihood` scores the images it is given
(already binary ones when ``raeflow eval --task likelihood`` passes the fixed seed-0 binarisation), exactly.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.capabilities import capabilities_of
from raeflow.models.base import Stage, TrainPlan
from raeflow.models.pixel_layers import GatedPixelCNN
from raeflow.registry import register_model

BINARIZE = ("dynamic", "none")


@register_model("pixelcnn", "gated PixelCNN over binarised pixels: exact likelihood, pixel-by-pixel sampling "
                            "(van den Oord et al. 2016)")
class PixelCNN(nn.Module):
    """Gated PixelCNN with vertical and horizontal stacks (no blind spot), Bernoulli per pixel.

    ``channels`` x ``layers`` sets the cost: one MNIST epoch at 64 x 12 is ~290 TFLOP, far beyond two CPU cores;
    the defaults (16 x 4) are the tests' size, ``configs/mnist-pixelcnn.yaml`` the measured recipe. The
    receptive field reaches ``first_kernel_size // 2 + (layers - 1) * (kernel_size // 2)`` rows up and
    columns sideways.
    Loss and selection metric: ``nll``, nats per image (summed over pixels).
    """

    capabilities = frozenset({cap.GENERATE, cap.LIKELIHOOD, cap.AUTOREGRESSIVE})
    selection_metric = "val_nll"
    loss_kind = "bce"  # Bernoulli pixels (what consumers read to know the data space is [0, 1])
    corruption = None  # takes no input corruption

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), channels: int = 16, layers: int = 4,
                 kernel_size: int = 3, first_kernel_size: int | None = None, head_channels: int | None = None,
                 binarize: str = "dynamic"):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"pixelcnn models images (C, H, W); got input_shape {list(self.input_shape)}")
        if binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {BINARIZE}; got {binarize!r}")
        self.binarize = binarize
        c = self.input_shape[0]
        self.net = GatedPixelCNN(c, c, channels, layers, kernel_size, head_channels, first_kernel_size)  # (B,C,H,W) -> logits

    # ----------------------------------------------------------------------------------------- interface
    @property
    def input_dim(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    @property
    def sample_steps(self) -> int:
        """Sequential network passes one ``sample(n)`` call takes (whatever n): what callers bound n by."""
        return self.input_shape[1] * self.input_shape[2]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, *input_shape): the Bernoulli logit of each pixel given the ones before it."""
        return self.net(x.reshape(-1, *self.input_shape))

    def log_likelihood(self, x: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Exact log p(x) in nats, (B,), for images with values in {0, 1} (``k`` is ignored: nothing to sample).
        Grey values act as soft targets (the expected log-likelihood of a binarisation, with the grey image
        as the context), which is not a likelihood: binarise first."""
        x = x.reshape(-1, *self.input_shape)
        return -F.binary_cross_entropy_with_logits(self.logits(x), x, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n binary images, (n, *input_shape), drawn one pixel at a time: H * W forward passes, each on the rows
        computed so far only (rows below never influence the ones above). The channels of one pixel are drawn
        independently given the pixels before it."""
        c, h, w = self.input_shape
        dev = next(self.parameters()).device
        x = torch.zeros(n, c, h, w, device=dev)
        for i in range(h):
            for j in range(w):
                logit = self.net(x[:, :, : i + 1])[:, :, i, j]  # (n, C)
                u = torch.rand(logit.shape, generator=generator, device=dev)
                x[:, :, i, j] = (u < torch.sigmoid(logit)).to(x.dtype)
        return x

    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        """The trainer's stage hook (see ``Autoencoder.enter_stage``): the stages' ``frozen`` lists do the work."""

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("train", plan.epochs)]

    def _binarized(self, x: torch.Tensor) -> torch.Tensor:
        if self.binarize == "none":
            return x
        if self.training:
            return torch.bernoulli(x)
        # Evaluation: one fixed draw (images already in {0, 1} are left as they are), so val_nll is comparable
        # across epochs and between runs.
        g = torch.Generator(device=x.device).manual_seed(0)
        return torch.bernoulli(x, generator=g)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        xb = self._binarized(x.reshape(-1, *self.input_shape).clamp(0, 1))
        nll = -self.log_likelihood(xb).mean()  # nats per image
        return {"loss": nll, "nll": nll}

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "input_shape": list(self.input_shape),
                "capabilities": sorted(capabilities_of(self)),
                "parameters": sum(p.numel() for p in self.parameters())}
