"""raeflow: train, run and serve the autoencoder family on Ray.

Importing ``raeflow`` (models, losses, data) never imports Ray; the Ray modules are ``raeflow.train.ray``,
``raeflow.embed`` and ``raeflow.serve``.
"""
__version__ = "0.1.0"

from raeflow.registry import build_model, list_variants, register_model  # noqa: E402,F401


def load_model(path):
    """Load a saved model (a run directory or its ``model/`` directory) in eval mode."""
    from raeflow.io import load_model as _load

    return _load(path)


__all__ = ["__version__", "build_model", "list_variants", "load_model", "register_model"]
