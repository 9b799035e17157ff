"""What ``raeflow serve`` deploys: the models, the indexes and the Serve deployment options (no Ray imported here,
so ``raeflow serve --stop`` and the unit tests need no Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeOptions:
    """How the ingress is deployed. ``replicas``: an int, or "auto" for autoscaling between min/max."""

    replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 2
    #: Serve's autoscaler target; with batching a replica works best with a full batch in hand plus the next one
    #: queueing, so the target is about a batch, not Serve's default of 2.
    target_ongoing_requests: float = 16
    #: Per replica. Serve's default (5) caps a batch at 5 requests: measured 43 req/s against 201 with 32.
    max_ongoing_requests: int = 64
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    num_cpus: float = 1.0
    gpu: bool = False
    #: torch threads per replica (0: leave torch's default, which Ray sets from num_cpus)
    threads: int = 0

    def deployment_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": {"num_cpus": self.num_cpus,
                                                      "num_gpus": 1 if self.gpu else 0}}
        if self.replicas == "auto":
            opts["num_replicas"] = "auto"
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "initial_replicas": self.min_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = int(self.replicas)
        return opts


@dataclass
class ModelSpec:
    name: str
    path: str


@dataclass
class IndexSpec:
    name: str
    path: str


@dataclass
class AppConfig:
    models: list[ModelSpec]
    indexes: list[IndexSpec] = field(default_factory=list)
    options: ServeOptions = field(default_factory=ServeOptions)
