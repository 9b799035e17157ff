"""Restricted Boltzmann machines trained by contrastive divergence, for greedy layer-wise pretraining.

Hinton & Salakhutdinov (2006) pretrained the deep autoencoder 784-1000-500-250-30 as a stack of RBMs, each trained
by CD-1 on the hidden probabilities of the one below, then *unrolled* the stack into an encoder and a decoder with
tied initial weights and fine-tuned it end to end. This module holds the RBM layer and the pieces a model needs to
declare that recipe as stages of the one trainer (``rbm-1`` ... ``rbm-n``, then ``finetune``); the trainer learns
nothing about RBMs.

CD through autograd: the free energy F(v) = -b.v - sum_j log(1 + exp(c_j + W_j.v)) has dF/dW_ij = -v_i p(h_j|v),
so the surrogate loss ``mean F(v_data) - mean F(v_model)`` with ``v_model`` a detached CD-k negative sample has the
gradient -(<v h>_data - <v h>_model): exactly CD's update, sign-flipped for a minimiser. As a loss, it goes through
``forward``, so DDP averages it across workers and checkpoints/resume work as for every other stage. Hinton's
weight cost (2e-4 on the weights, not the biases) is the gradient of ``weight_cost / 2 * ||W||^2``, added to it.

Documents: the bottom RBM of their document model has *constrained Poisson* visible units over word counts
(Salakhutdinov & Hinton, "Semantic hashing", 2009, eq. 4): p(h_j=1|v) = sigmoid(b_j + W_j.v) on the counts, and
the visible rates N * softmax(c + W^T h), which sum to the document's length N. The free energy above is unchanged
(it is the hidden side's), so the same surrogate gives CD's update; only the negative data differ.

The settings are those of the authors' Matlab code (``rbm.m``, ``rbmhidlinear.m``, ``mnistdeepauto.m``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raeflow.errors import ConfigError
from raeflow.models.base import OptimSpec, Phase, Stage

BERNOULLI, GAUSSIAN, POISSON = "bernoulli", "gaussian", "poisson"


class RBM(nn.Module):
    """Bernoulli visible units, or constrained Poisson ones over word counts (``visible="poisson"``); Bernoulli
    (logistic) hidden units, or linear hidden units with unit-variance Gaussian noise (``hidden="gaussian"``: the
    code layer of Hinton & Salakhutdinov's autoencoder).

    ``weight`` is (n_hidden, n_visible), nn.Linear's layout, so unrolling is a copy: the encoder layer gets
    ``weight`` / ``hidden_bias``, the mirrored decoder layer ``weight.T`` / ``visible_bias``.
    """

    def __init__(self, n_visible: int, n_hidden: int, hidden: str = BERNOULLI, init_std: float = 0.1,
                 visible: str = BERNOULLI):
        super().__init__()
        if hidden not in (BERNOULLI, GAUSSIAN):
            raise ConfigError(f"unknown RBM hidden units {hidden!r}; use {BERNOULLI!r} or {GAUSSIAN!r}")
        if visible not in (BERNOULLI, POISSON):
            raise ConfigError(f"unknown RBM visible units {visible!r}; use {BERNOULLI!r} or {POISSON!r}")
        self.hidden, self.visible = hidden, visible
        # Hinton's init: weights 0.1 * N(0, 1), biases zero.
        self.weight = nn.Parameter(torch.randn(n_hidden, n_visible) * init_std)  # (H, V)
        self.hidden_bias = nn.Parameter(torch.zeros(n_hidden))  # (H,)
        self.visible_bias = nn.Parameter(torch.zeros(n_visible))  # (V,)

    def hidden_mean(self, v: torch.Tensor) -> torch.Tensor:
        """(B, V) -> (B, H): p(h=1|v) for Bernoulli units, E[h|v] for Gaussian ones (the mean-field pass)."""
        return self._hidden_act(F.linear(v, self.weight, self.hidden_bias))

    def _hidden_act(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pre) if self.hidden == BERNOULLI else pre

    def sample_hidden(self, mean: torch.Tensor) -> torch.Tensor:
        if self.hidden == BERNOULLI:
            return (mean > torch.rand_like(mean)).to(mean.dtype)
        return mean + torch.randn_like(mean)  # unit-variance Gaussian noise

    def visible_mean(self, h: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) -> (B, V): p(v=1|h); for Poisson units the rates, which sum to ``length`` (B, 1), the
        documents' word counts (the softmax alone when it is None)."""
        pre = F.linear(h, self.weight.t(), self.visible_bias)  # (B, V)
        if self.visible == BERNOULLI:
            return torch.sigmoid(pre)
        rates = torch.softmax(pre, dim=1)
        return rates if length is None else rates * length

    def free_energy(self, v: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) -> (B,) free energy, up to a constant (Gaussian units: the integral over h is in closed form).
        ``pre``: the hidden pre-activations of ``v`` when already computed."""
        pre = F.linear(v, self.weight, self.hidden_bias) if pre is None else pre  # (B, H)
        hidden_term = F.softplus(pre).sum(1) if self.hidden == BERNOULLI else 0.5 * (pre ** 2).sum(1)
        return -(v @ self.visible_bias) - hidden_term

    @torch.no_grad()
    def negative(self, v: torch.Tensor, k: int = 1, mean: torch.Tensor | None = None) -> torch.Tensor:
        """CD-k's negative visible data: k Gibbs steps from sampled hidden states of ``v``. As in Hinton's code,
        the visible side uses probabilities (no visible sampling), so ``v`` may be grey levels. ``mean``: the
        hidden means of ``v`` when already computed."""
        h = self.sample_hidden(self.hidden_mean(v) if mean is None else mean)
        length = v.sum(1, keepdim=True) if self.visible == POISSON else None  # (B, 1): N of each document
        for i in range(k):
            v_neg = self.visible_mean(h, length)  # (B, V)
            if i < k - 1:
                h = self.sample_hidden(self.hidden_mean(v_neg))
        return v_neg

    def cd_terms(self, v: torch.Tensor, k: int = 1, weight_cost: float = 0.0) -> dict[str, torch.Tensor]:
        """The surrogate loss whose gradient is CD-k's (plus weight cost), and the squared error of the negative
        data per example (the figure Hinton's code prints for each epoch)."""
        pre = F.linear(v, self.weight, self.hidden_bias)  # (B, H), once for the data's free energy and the chain
        v_neg = self.negative(v, k, mean=self._hidden_act(pre.detach()))
        cd = self.free_energy(v, pre).mean() - self.free_energy(v_neg).mean()
        loss = cd + 0.5 * weight_cost * (self.weight ** 2).sum()
        recon = ((v - v_neg) ** 2).sum(1).mean()
        return {"loss": loss, "recon": recon}


@dataclass
class RBMSettings:
    """Pretraining settings; the defaults are Hinton & Salakhutdinov's (``mnistdeepauto.m``, ``rbm.m``)."""

    cd_k: int = 1  # Gibbs steps of contrastive divergence
    lr: float = 0.1  # weights and biases of the Bernoulli RBMs
    code_lr: float = 0.001  # the top RBM with linear (Gaussian) hidden units: larger steps diverge
    # the bottom RBM of a document model (Poisson visible units over word counts): its inputs are counts, tens to
    # hundreds per document rather than [0, 1], so its CD statistics are that much larger
    count_lr: float = 0.001
    momentum: float = 0.5  # for the first `momentum_epochs` epochs of each RBM ...
    final_momentum: float = 0.9  # ... then this (the code switches after epoch 5)
    momentum_epochs: int = 5
    weight_cost: float = 2e-4  # L2 on the weights only
    init_std: float = 0.1  # weights 0.1 * N(0, 1)

    @classmethod
    def from_config(cls, d: dict[str, Any] | None) -> "RBMSettings | None":
        if d is None:
            return None
        unknown = set(d) - set(asdict(cls()))
        if unknown:
            raise ConfigError(f"unknown rbm settings {sorted(unknown)}; known: {sorted(asdict(cls()))}")
        s = cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items()})
        if s.cd_k < 1:
            raise ConfigError(f"rbm.cd_k must be at least 1; got {s.cd_k}")
        return s

    def optim(self, rbm: RBM) -> OptimSpec:
        """SGD with Hinton's momentum schedule, constant learning rate; weight cost lives in the loss."""
        lr = (min(self.count_lr, self.code_lr) if rbm.visible == POISSON and rbm.hidden == GAUSSIAN
              else self.count_lr if rbm.visible == POISSON else self.code_lr if rbm.hidden == GAUSSIAN else self.lr)
        return OptimSpec(kind="sgd", lr=lr,
                         momentum=((0, self.momentum), (self.momentum_epochs, self.final_momentum)))


class RBMStack(nn.Module):
    """RBMs ``rbm1 ... rbmN`` over widths ``sizes = [D, h1, ..., hN]``; the top one may be Gaussian-hidden, the
    bottom one Poisson-visible (``bottom_visible="poisson"``: word counts).

    A model that pretrains with it keeps it as one attribute (say ``self.rbms``) and declares :meth:`stages`;
    ``forward`` answers stage ``rbm-k`` with :meth:`terms`; on entering fine-tuning the model copies the weights
    into its own layers (:meth:`unroll_pairs` gives them in order).
    """

    def __init__(self, sizes: Sequence[int], top_hidden: str, settings: RBMSettings,
                 bottom_visible: str = BERNOULLI):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.settings = settings
        n = len(self.sizes) - 1
        for k in range(1, n + 1):
            hidden = top_hidden if k == n else BERNOULLI
            visible = bottom_visible if k == 1 else BERNOULLI
            setattr(self, f"rbm{k}", RBM(self.sizes[k - 1], self.sizes[k], hidden, settings.init_std, visible))
        self.num_layers = n

    def layer(self, k: int) -> RBM:
        if not 1 <= k <= self.num_layers:
            raise ConfigError(f"no RBM {k}; the stack has rbm-1 .. rbm-{self.num_layers}")
        return getattr(self, f"rbm{k}")

    def names(self) -> list[str]:
        return [f"rbm{k}" for k in range(1, self.num_layers + 1)]

    def stages(self, attr: str, epochs: int, frozen_besides: Sequence[str]) -> list[Stage]:
        """One stage per RBM, ``rbm-1`` .. ``rbm-n``, each training ``attr.rbmK`` alone with its own SGD; every
        other module (``frozen_besides`` and the other RBMs) is frozen, as DDP needs."""
        out = []
        for k in range(1, self.num_layers + 1):
            mine = f"{attr}.rbm{k}"
            others = [f"{attr}.{n}" for n in self.names() if n != f"rbm{k}"]
            out.append(Stage(f"rbm-{k}", epochs,
                             phases=[Phase("main", modules=[mine], optim=self.settings.optim(self.layer(k)))],
                             frozen=[*frozen_besides, *others]))
        return out

    @torch.no_grad()
    def up(self, v: torch.Tensor, upto: int) -> torch.Tensor:
        """Mean-field pass through RBMs 1..upto: (B, D) -> (B, sizes[upto]); the data of RBM upto+1."""
        h = v
        for k in range(1, upto + 1):
            h = self.layer(k).hidden_mean(h)
        return h

    def mean_field_reconstruction(self, v: torch.Tensor) -> torch.Tensor:
        """Up through every RBM's hidden means, down through every visible mean: (B, D) -> (B, D). What the
        unrolled autoencoder computes before any fine-tuning."""
        h = self.up(v, self.num_layers)
        for k in range(self.num_layers, 0, -1):
            h = self.layer(k).visible_mean(h, v.sum(1, keepdim=True) if k == 1 else None)
        return h

    def terms(self, stage: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of stage ``rbm-k``: CD on the lower RBMs' hidden probabilities of the batch."""
        k = int(stage.rsplit("-", 1)[1])
        data = self.up(x.flatten(1), k - 1)  # (B, sizes[k-1]), no gradient: the lower RBMs are done
        return self.layer(k).cd_terms(data, self.settings.cd_k, self.settings.weight_cost)

    @torch.no_grad()
    def unroll_into(self, encoder: Sequence[nn.Linear], decoder_weights: Sequence[torch.Tensor | None],
                    decoder_biases: Sequence[torch.Tensor]) -> None:
        """Copy RBM k into encoder layer k (W, hidden bias) and into the decoder layer that mirrors it (W.T,
        visible bias). ``decoder_*`` are listed from the code outwards (the decoder's order), so RBM k's
        visible side is entry ``n - k``; a ``None`` weight is a tied decoder, which reads the encoder's."""
        n = self.num_layers
        if len(encoder) != n:
            raise ConfigError(f"the stack has {n} RBMs but the encoder {len(encoder)} layers")
        for k in range(1, n + 1):
            rbm = self.layer(k)
            encoder[k - 1].weight.copy_(rbm.weight)
            encoder[k - 1].bias.copy_(rbm.hidden_bias)
            w = decoder_weights[n - k]
            if w is not None:
                w.copy_(rbm.weight.t())
            decoder_biases[n - k].copy_(rbm.visible_bias)
