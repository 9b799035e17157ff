"""The Ray Serve shell: one ingress deployment whose replicas hold every served model and batch their calls.

Everything a request means is in ``raeflow.serve.service`` and the routes in ``raeflow.serve.api``; this module
adds what only Serve has: replicas (fixed or autoscaled), per-replica request batching (``@serve.batch``), and
the deployment options that let batches fill.

Why one batched method for every model and operation: ``@serve.batch`` queues per decorated method, so a single
queue lets requests to different models share the wait; :func:`run_jobs` then groups the batch by
(model, operation) and makes one model call per group.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve

from raeflow.serve.api import build_app
from raeflow.serve.options import AppConfig, ServeOptions
from raeflow.serve.service import ModelService, Stats, run_jobs

APP_NAME = "raeflow"


@serve.deployment(name="RaeflowIngress")
@serve.ingress()
class RaeflowIngress:
    """A replica: loads every model once, answers HTTP through :func:`build_app`, batches model calls."""

    def __init__(self, config: dict[str, Any]):
        from raeflow.serve.node_local import bind_replica_grpc_to_node

        bind_replica_grpc_to_node()  # Serve binds this replica's internal gRPC server to [::]; see node_local.py
        opts = ServeOptions(**config["options"])
        if opts.threads:
            import torch

            torch.set_num_threads(opts.threads)
        device = "cuda" if opts.gpu else "cpu"
        self.services = {m["name"]: ModelService.load(m["path"], m["name"], device) for m in config["models"]}
        from raeflow.serve.search import load_indexes

        load_indexes(config.get("indexes") or [], self.services)
        self.stats = Stats()
        # GET /replica: on a cluster, which replica and node answered (tests/test_multinode.py checks the spread).
        import ray

        self.placement = {"replica": serve.get_replica_context().replica_id.unique_id,
                          "node": ray.get_runtime_context().get_node_id()}
        self._batched.set_max_batch_size(opts.max_batch_size)
        self._batched.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        # Built on the replica, after __init__, so the routes close over this replica's models (Serve 2.60's
        # late-bound ingress: @serve.ingress() with no app).
        return build_app(self)

    async def run(self, model: str, op: str, x: np.ndarray) -> np.ndarray:
        out = await self._batched((model, op, x))
        if isinstance(out, BaseException):
            raise out
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[tuple[str, str, np.ndarray]]) -> list[Any]:
        # The model call runs in a worker thread (torch releases the GIL), so this replica's event loop keeps
        # parsing and answering the other requests meanwhile: parsing the next batch overlaps computing this one.
        return await asyncio.to_thread(run_jobs, self.services, jobs, self.stats)


def build(config: AppConfig):
    """The bound Serve application for ``serve.run``."""
    payload = {"models": [asdict(m) for m in config.models], "indexes": [asdict(i) for i in config.indexes],
               "options": asdict(config.options)}
    return RaeflowIngress.options(**config.options.deployment_options()).bind(payload)

