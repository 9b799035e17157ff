"""What a trained model can do, declared by its class: the one vocabulary serve, eval, embed and plots read.

A variant declares ``capabilities`` as a class attribute (a frozenset of the names below); an instance may add
to it from its own config (any reconstructing model trained on corrupted inputs is a denoiser), through
:meth:`raeflow.models.base.Autoencoder.declared_capabilities`. Nothing outside ``raeflow/models/`` decides what a
model can do from its variant name or by probing for methods: it asks :func:`capabilities_of`.

Each capability is a promise about methods (``METHODS``): the contract tests call them on every variant that
declares it, so a declaration cannot drift from the code.
"""
from __future__ import annotations

from typing import Any
from raeflow.errors import ConfigError

ENCODE = "encode"  # encode(x) -> (B, latent_dim) codes (the posterior mean for probabilistic encoders)
RECONSTRUCT = "reconstruct"  # reconstruct(x) -> (B, *input_shape); decode(z) maps codes back to inputs
DENOISE = "denoise"  # trained to undo corruption: denoise(noisy) -> (B, *input_shape) clean estimate
GENERATE = "generate"  # sample(n, generator) from a prior over codes/pixels -> (n, *input_shape)
POSTERIOR = "posterior"  # encode_stats(x) -> (mu, logvar), each (B, latent_dim): a Gaussian posterior
LIKELIHOOD = "likelihood"  # log_likelihood(x, k) -> (B,) log p(x) in nats (exact, or a k-sample bound)
CLASSIFY = "classify"  # predict(x) -> (B, num_classes) logits
DISCRETE_CODES = "discrete_codes"  # encode_indices(x) -> (B, *code_grid) int64 codebook indices
AUTOREGRESSIVE = "autoregressive"  # sample() draws one position at a time (``sample_steps`` forward passes)

ALL = (ENCODE, RECONSTRUCT, DENOISE, GENERATE, POSTERIOR, LIKELIHOOD, CLASSIFY, DISCRETE_CODES, AUTOREGRESSIVE)

#: the methods each capability promises (the contract tests call them)
METHODS: dict[str, tuple[str, ...]] = {
    ENCODE: ("encode",),
    RECONSTRUCT: ("reconstruct", "decode"),
    DENOISE: ("denoise",),
    GENERATE: ("sample",),
    POSTERIOR: ("encode_stats",),
    LIKELIHOOD: ("log_likelihood",),
    CLASSIFY: ("predict",),
    DISCRETE_CODES: ("encode_indices", "decode_indices"),
    AUTOREGRESSIVE: ("sample",),  # and the attribute ``sample_steps``: forward passes per sample
}


def capabilities_of(model: Any) -> frozenset[str]:
    """The capabilities a built model declares (its class's, plus what its own config adds)."""
    declared = getattr(model, "declared_capabilities", None)
    caps = frozenset(declared()) if callable(declared) else frozenset(getattr(model, "capabilities", ()))
    unknown = caps - set(ALL)
    if unknown:
        raise ConfigError(f"{type(model).__name__} declares unknown capabilities {sorted(unknown)}; known: {list(ALL)}")
    return caps
