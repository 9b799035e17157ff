"""Shared test fixtures: small batches of real data (digits, MNIST, Reuters document vectors).

Tests share two cores with other work: one torch thread each, small batches, session-cached data.
"""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 64 scikit-learn digits of raeflow's training split: x (64, 1, 8, 8) in [0, 1], y (64,)."""
    from raeflow.data import load_training_data

    d = load_training_data("digits")
    return torch.from_numpy(d.train.x[:64]).clone(), torch.from_numpy(d.train.y[:64]).clone()


@pytest.fixture(scope="session")
def mnist_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """32 MNIST training images: x (32, 1, 28, 28) in [0, 1], y (32,)."""
    from raeflow.data.images import load_mnist

    raw = load_mnist("train")
    return torch.from_numpy(raw.x[:32]).clone(), torch.from_numpy(raw.y[:32]).clone()


@pytest.fixture(scope="session")
def docs_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """32 Reuters-R8 training documents as 100-stem log-count vectors: x (32, 100) in [0, 1], y (32,)."""
    from raeflow.data.text import Vectoriser, load_reuters_r8

    raw = load_reuters_r8("train")
    docs = raw.x[:200]
    vec = Vectoriser(vocab_size=100, weighting="log").fit(docs)
    return torch.from_numpy(vec.transform(docs[:32])), torch.from_numpy(raw.y[:32]).clone()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (Ray Train / Data / Serve tests share it).

    2 CPUs, no dashboard, a 512 MiB object store, sockets on 127.0.0.1 (raeflow.raycluster's settings); a
    worker group that cannot start fails after 30 s instead of hanging (REFERENCE.md). Yields the ``ray`` module.
    """
    import os

    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"  # read by Train at each fit(), from the driver
    from raeflow import raycluster

    raycluster.ensure_ray(None, num_cpus=2, object_store_memory=512 * 2**20, owner="tests", log=lambda s: None)
    import ray

    yield ray
    raycluster.shutdown_if_started("tests")


# ------------------------------------------------------------------------------------------------- serving
# Shared by tests/test_serve.py and tests/test_serve_fuzz.py: two small models trained once, and one Ray Serve
# application on 127.0.0.1 (a free port) for the whole session, on the session's `ray_local` instance.
@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict[str, str]:
    """A 2-D VAE (a generator, for /generate, /interpolate, /grid) and a DAE (a denoiser), trained in-process on
    scikit-learn digits (8x8) in a few seconds. Returns {model name: run directory}."""
    from raeflow.cli.common import build_run_config
    from raeflow.train.run import train

    root = tmp_path_factory.mktemp("serve-models")
    runs = {"vae2d": ("vae", 2, ["model.hidden=[64]"]), "dae": ("dae", 24, ["model.hidden=[128]"])}
    out = {}
    for name, (variant, k, sets) in runs.items():
        cfg = build_run_config(None, sets, variant=variant, dataset="digits", epochs=8, latent_dim=k, batch_size=64,
                               output=str(root / name), seed=0)
        train(cfg, local=True, log=lambda *_: None)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="session")
def serve_url(ray_local, serve_models) -> str:
    """Base URL of the Serve application serving ``serve_models``; Serve is shut down at the session's end."""
    import socket

    from ray import serve

    from raeflow.serve.run import ServerSpec, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # num_cpus=0: the replica must not hold one of the session's 2 CPUs, which Train/Data tests need whole.
    spec = ServerSpec(models=list(serve_models.values()), port=port,
                      options={"num_cpus": 0, "threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.01})
    server = start(spec, log=lambda *_: None, timeout_s=120)
    yield server.url
    server.stop()
    serve.shutdown()
