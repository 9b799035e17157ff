"""Input corruption for denoising training (Vincent et al. 2008/2010), applied per batch on the fly.

The three kinds of the literature: additive isotropic Gaussian noise, masking noise (each input set to 0 with
probability ``level``) and salt-and-pepper (each input set to 0 or 1 at random with probability ``level``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from raeflow.errors import ConfigError

KINDS = ("gaussian", "masking", "salt_and_pepper")


@dataclass
class Corruption:
    kind: str = "masking"
    level: float = 0.25  # std for gaussian; the corrupted fraction for masking / salt_and_pepper
    clip: bool = True  # keep gaussian-noised pixels in [0, 1] so BCE targets and inputs share a range

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown corruption {self.kind!r}; use one of {KINDS}")
        if self.level < 0 or (self.kind != "gaussian" and self.level > 1):
            raise ConfigError(f"corruption level {self.level} out of range for {self.kind}")

    @classmethod
    def from_config(cls, cfg: dict | None) -> "Corruption | None":
        return None if not cfg else cls(**cfg)

    def to_config(self) -> dict:
        return asdict(self)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.level == 0:
            return x
        if self.kind == "gaussian":
            noisy = x + self.level * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return noisy.clamp(0, 1) if self.clip else noisy
        hit = torch.rand(x.shape, generator=generator, device=x.device) < self.level
        if self.kind == "masking":
            return x.masked_fill(hit, 0.0)
        salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
        return torch.where(hit, salt.to(x.dtype), x)
