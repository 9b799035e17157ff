"""The one interface every raeflow autoencoder shares, and the training plan each model declares.

A model is plain PyTorch (no Ray here). It declares *how* it trains as a list of :class:`Stage` objects, each a
list of :class:`Phase` objects (one optimiser per phase), so a single trainer (``raeflow.train.loop``) serves
every variant: a plain AE is one stage with one phase, an AAE one stage with reconstruction / discriminator /
generator phases, an SDAE one stage per pretrained layer then a supervised fine-tuning stage.

``forward(x, y, stage=, phase=)`` returns a dict of named loss terms whose ``"loss"`` entry is the one to
backpropagate. Training goes through ``forward`` (not a side method) because DistributedDataParallel only
synchronises gradients for computations made through the wrapped module's ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.corruption import Corruption
from raeflow.errors import ConfigError, UnsupportedError

Shape = tuple[int, ...]


@dataclass
class OptimSpec:
    """An optimiser a model's recipe fixes for one phase, in place of the run config's (RBM pretraining is
    Hinton's SGD with a momentum schedule whatever the fine-tuning uses). The trainer honours it generically."""

    kind: str = "sgd"  # adam | adamw | sgd
    lr: float = 0.1  # absolute: not scaled by the run's lr
    #: SGD momentum as steps ``(from epoch of the stage, momentum)``; Hinton's RBMs: ((0, 0.5), (5, 0.9))
    momentum: Sequence[tuple[int, float]] = ((0, 0.9),)
    weight_decay: float = 0.0
    schedule: str = "none"  # none | cosine | onecycle | step, as the run config's

    def momentum_at(self, epoch_in_stage: int) -> float:
        """The momentum of the step that starts at or before ``epoch_in_stage`` (0-based)."""
        m = self.momentum[0][1]
        for start, value in self.momentum:
            if epoch_in_stage >= start:
                m = value
        return float(m)


@dataclass
class Phase:
    """One optimiser step per batch. ``modules`` names the sub-modules whose parameters it updates (empty: all
    trainable parameters; dotted paths such as ``rbms.rbm1`` reach nested ones); ``lr_scale`` multiplies the
    run's learning rate (AAE's discriminator, say); ``optim``, when set, replaces the run's optimiser settings."""

    name: str
    modules: Sequence[str] = ()
    lr_scale: float = 1.0
    optim: OptimSpec | None = None


@dataclass
class Stage:
    """A block of epochs with its own phases and optimisers.

    ``supervised`` stages need labels; ``closed_form`` stages (PCA) call ``model.accumulate`` on every batch of
    one pass and ``model.finalize`` at its end instead of taking gradient steps; ``frozen`` names modules whose
    parameters get ``requires_grad=False`` for the stage (SDAE's lower layers during pretraining).
    """

    name: str
    epochs: int
    phases: list[Phase] = field(default_factory=lambda: [Phase("main")])
    supervised: bool = False
    closed_form: bool = False
    frozen: Sequence[str] = ()


@dataclass
class TrainPlan:
    """What the trainer needs from the run config to plan stages (kept small so models stay config-agnostic)."""

    epochs: int = 10
    stage_epochs: dict[str, int] = field(default_factory=dict)  # per-stage overrides, e.g. {"pretrain": 5}

    def epochs_for(self, stage: str, default: int | None = None) -> int:
        return int(self.stage_epochs.get(stage, self.epochs if default is None else default))


def reconstruction_loss(raw: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example reconstruction loss summed over features, averaged over the batch.

    ``raw`` is the decoder's pre-activation output: BCE uses it as logits (numerically stable), MSE applies the
    sigmoid first so both losses compare outputs in [0, 1]. Summing over pixels makes the figure comparable with
    Hinton & Salakhutdinov's "squared error per image" and with the VAE's per-image ELBO.
    """
    raw = raw.flatten(1)
    x = x.flatten(1)
    if kind == "bce":
        per = F.binary_cross_entropy_with_logits(raw, x, reduction="none")
    elif kind == "mse":
        per = (torch.sigmoid(raw) - x) ** 2
    elif kind == "mse_linear":  # unbounded data (or linear AE compared with PCA): no squashing
        per = (raw - x) ** 2
    elif kind == "multinomial":
        # Word counts (any scale): the cross-entropy of the document's word distribution x / sum(x) under the
        # decoder's softmax, Hinton & Salakhutdinov's document fine-tuning loss. Per document, not per word, so a
        # long post weighs no more than a short one. An all-zero row (no vocabulary word) contributes nothing.
        p = x / x.sum(1, keepdim=True).clamp_min(1e-12)  # (B, V)
        per = -p * F.log_softmax(raw, dim=1)
    else:
        raise ConfigError(f"unknown reconstruction loss {kind!r}; use 'bce', 'mse', 'mse_linear' or 'multinomial'")
    return per.sum(1).mean()


class Autoencoder(nn.Module):
    """Base class: ``encode``, ``decode``, ``reconstruct``, ``interpolate``; subclasses fill ``_encode`` /
    ``_decode_raw`` and, where they need more than a reconstruction loss, ``forward``."""

    variant: str = "?"  # set by @register_model
    #: what every instance of the class can do (see raeflow.models.capabilities); consumers read
    #: ``declared_capabilities()``, never the variant name
    capabilities: frozenset[str] = frozenset({cap.ENCODE, cap.RECONSTRUCT})
    #: lower is better; the trainer keeps the checkpoint that minimises it in the final stage
    selection_metric: str = "val_loss"

    def __init__(self, input_shape: Sequence[int], latent_dim: int, loss: str = "bce",
                 corruption: dict | None = None):
        super().__init__()
        self.input_shape: Shape = tuple(int(s) for s in input_shape)  # (C, H, W) images or (D,) documents
        self.latent_dim = int(latent_dim)
        self.loss_kind = loss
        # Corruption is a training-time option of every reconstructing variant (DAE is AE + a default one).
        self.corruption = Corruption.from_config(corruption)

    # ----------------------------------------------------------------------------------------- interface
    def declared_capabilities(self) -> frozenset[str]:
        """The class's capabilities, plus ``denoise`` when this instance was trained on corrupted inputs."""
        caps = set(type(self).capabilities)
        if self.corruption is not None and cap.RECONSTRUCT in caps:
            caps.add(cap.DENOISE)
        return frozenset(caps)

    @property
    def bounded(self) -> bool:
        """Inputs and outputs are intensities in [0, 1]; False for a linear decoder (any finite value) and for word
        counts (``multinomial``: the input is counts, the output their distribution)."""
        return self.loss_kind not in ("mse_linear", "multinomial")

    @property
    def input_dim(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, latent_dim); the posterior mean for probabilistic encoders."""
        return self._encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, *input_shape) in data space ([0, 1] unless the loss is ``mse_linear``; for
        ``multinomial`` the word distribution, each row summing to 1)."""
        return self._activate(self._decode_raw(z)).reshape(z.shape[0], *self.input_shape)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """A denoiser's answer to a noisy input. Most variants: their reconstruction."""
        return self.reconstruct(x)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Decode ``steps`` codes on the line from encode(a) to encode(b); a, b: (*input_shape) or (1, ...)."""
        za = self.encode(a.reshape(1, *self.input_shape))
        zb = self.encode(b.reshape(1, *self.input_shape))
        t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(1)  # (steps, 1)
        return self.decode(za * (1 - t) + zb * t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise UnsupportedError(f"{self.variant} has no prior to sample from")

    def encoder_modules(self) -> list[nn.Module]:
        """The modules that map an input to its code, in order; `finetune` stacks a softmax head on them."""
        return [self.encoder]

    def stages(self, plan: TrainPlan) -> list[Stage]:
        return [Stage("train", plan.epochs)]

    def enter_stage(self, stage: Stage, fresh: bool = True) -> None:
        """Called by the trainer on entering ``stage``, after freezing and before building its optimisers.
        ``fresh`` is False when a resumed run re-enters a stage it had started (its weights come from the
        checkpoint and must not be re-initialised). Default: nothing. RBM-pretrained models unroll their RBMs
        into the autoencoder here at the start of fine-tuning."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, stage: str = "train",
                phase: str = "main") -> dict[str, torch.Tensor]:
        """Loss terms for one batch. The default: reconstruct a (possibly corrupted) input, score the clean one."""
        x_in = self.corrupt(x)
        raw = self._decode_raw(self._encode(x_in))
        recon = reconstruction_loss(raw, x, self.loss_kind)
        return {"loss": recon, "recon": recon}

    # ------------------------------------------------------------------------------------------ helpers
    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the configured corruption in training mode only (evaluation scores clean inputs)."""
        if self.training and self.corruption is not None:
            return self.corruption(x)
        return x

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "multinomial":  # (B, V) logits -> the word distribution, rows summing to 1
            return torch.softmax(raw.flatten(1), dim=1).reshape(raw.shape)
        return raw if self.loss_kind == "mse_linear" else torch.sigmoid(raw)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What /models and `raeflow variants` say of a built model."""
        return {"variant": self.variant, "input_shape": list(self.input_shape), "latent_dim": self.latent_dim,
                "capabilities": sorted(self.declared_capabilities()),
                "parameters": sum(p.numel() for p in self.parameters())}


def parameters_of(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Parameter]:
    """Trainable parameters of the named sub-modules (all trainable parameters when ``names`` is empty)."""
    names = list(names)
    mods = [model] if not names else [model.get_submodule(n) for n in names]
    seen: set[int] = set()
    for m in mods:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def mlp(sizes: Sequence[int], activation: str = "relu", last_activation: bool = False) -> nn.Sequential:
    """Dense stack ``sizes[0] -> ... -> sizes[-1]``; activation between layers (and after the last if asked)."""
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU,
            "leaky_relu": nn.LeakyReLU, "linear": nn.Identity}
    if activation not in acts:
        raise ConfigError(f"unknown activation {activation!r}; use one of {sorted(acts)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)
