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
    worker group that cannot start fails after 30 s instead of hanging (Ray 2.60 retries a failed start forever). Yields the ``ray`` module.
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
def serve_index(serve_models, tmp_path_factory) -> str:
    """An embeddings directory of the DAE's codes of the 300 digits test images (ids ``digits:test:i``), written
    with the embed job's own PartWriter from Encoder output, as `raeflow embed` writes it (no Ray needed)."""
    from raeflow.data.images import load_digits
    from raeflow.embed.encoder import Encoder
    from raeflow.embed.output import PartWriter, errors_schema, metadata, output_schema

    raw = load_digits("test")
    enc = Encoder(serve_models["dae"])
    meta = metadata(enc.artifact, "digits:test")
    out = tmp_path_factory.mktemp("serve-index") / "digits"
    w = PartWriter(out, output_schema(enc, meta), errors_schema(meta), rows_per_file=128)
    w.add(enc({"id": [f"digits:test:{i}" for i in range(len(raw.x))],
               "label": [raw.classes[int(v)] for v in raw.y], "x": raw.x}))
    w.close()
    return str(out)


@pytest.fixture(scope="session")
def serve_url(ray_local, serve_models, serve_index) -> str:
    """Base URL of the Serve application serving ``serve_models`` (and ``serve_index`` as index "digits");
    Serve is shut down at the session's end."""
    import socket

    from ray import serve

    from raeflow.serve.run import ServerSpec, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # num_cpus=0: the replica must not hold one of the session's 2 CPUs, which Train/Data tests need whole.
    spec = ServerSpec(models=list(serve_models.values()), port=port, indexes={"digits": serve_index},
                      options={"num_cpus": 0, "threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.01})
    server = start(spec, log=lambda *_: None, timeout_s=120)
    yield server.url
    server.stop()
    serve.shutdown()


# ------------------------------------------------------------------------------------------------- embedding
# Shared by tests/test_embed.py and tests/test_search_retrieval.py: small real models, made once per session.
def _embed_train(out, variant: str, k: int, sets: list[str], epochs: int) -> str:
    from raeflow.cli.common import build_run_config
    from raeflow.train.run import train

    cfg = build_run_config(None, sets, variant=variant, dataset="digits", epochs=epochs, latent_dim=k, batch_size=64,
                           output=str(out), seed=0)
    train(cfg, local=True, log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def embed_digits_ae(tmp_path_factory) -> str:
    """A dense AE 64-32-6 trained 3 epochs on digits (a run directory)."""
    return _embed_train(tmp_path_factory.mktemp("embed-models") / "ae", "ae", 6, ["model.hidden=[32]"], 3)


@pytest.fixture(scope="session")
def embed_digits_vae(tmp_path_factory) -> str:
    """A dense VAE 64-32-4 trained 1 epoch on digits: its embeddings carry ``logvar``."""
    return _embed_train(tmp_path_factory.mktemp("embed-models") / "vae", "vae", 4, ["model.hidden=[32]"], 1)


@pytest.fixture(scope="session")
def embed_doc_ae(tmp_path_factory) -> str:
    """A document AE (300 stems - 32 - 5, seeded random weights) with a Vectoriser fitted on 400 Reuters-R8
    training documents, saved as training saves one (model/config.json, model.safetensors, vectoriser.json)."""
    from raeflow.data.text import Vectoriser, load_reuters_r8
    from raeflow.io import save_model
    from raeflow.registry import build_model

    raw = load_reuters_r8("train")
    vec = Vectoriser(vocab_size=300, weighting="log").fit(raw.x[:400])
    torch.manual_seed(0)
    v = len(vec.vocabulary)
    model = build_model("ae", input_shape=[v], latent_dim=5, hidden=[32]).eval()
    run = tmp_path_factory.mktemp("embed-models") / "doc"
    save_model(model, run / "model", data={"name": "reuters-r8", "kind": "text", "input_shape": [v],
                                           "classes": raw.classes, "preprocessing": {"vectoriser": vec.describe()}},
               vectoriser=vec.to_json())
    return str(run)
