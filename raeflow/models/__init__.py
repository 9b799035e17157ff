"""Autoencoder variants: one file each, registered with ``@register_model``; ``base`` holds the interface."""
from raeflow.models.base import Autoencoder, Phase, Stage, TrainPlan  # noqa: F401
