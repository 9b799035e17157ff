"""raeflow: train, run and serve the autoencoder family on Ray.

Importing ``raeflow`` (models, losses, data, the plain services) never imports Ray. Ray enters only through
``raeflow.train.ray_engine`` (Ray Train), ``raeflow.embed.job`` / ``raeflow.data.sources`` (Ray Data),
``raeflow.serve.app`` / ``raeflow.serve.run`` (Ray Serve) and ``raeflow.raycluster`` (starting or joining Ray);
``tests/test_architecture.py`` checks that every other module imports without it.
"""
from raeflow.version import __version__  # noqa: F401

#: Names served from ``raeflow.registry`` on first use (PEP 562): importing a data rule (``raeflow.data.*``, which
#: every Ray Data task process runs) must not import torch and every model -- 180 MiB more per process, measured.
_FROM_REGISTRY = ("build_model", "list_variants", "register_model")


def __getattr__(name):
    if name in _FROM_REGISTRY:
        from raeflow import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'raeflow' has no attribute {name!r}")


def load_model(path):
    """Load a saved model (a run directory or its ``model/`` directory) in eval mode."""
    from raeflow.io import load_model as _load

    return _load(path)


__all__ = ["__version__", "build_model", "list_variants", "load_model", "register_model"]
