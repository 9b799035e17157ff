"""Capabilities decide everything after training: a variant defined here, inside the test, declaring two of them,
gets exactly the endpoints, eval tasks, embedding columns and contract checks they allow — with no change
anywhere else — and loses an endpoint and a task when it drops a capability. Then: serve and eval agree on every
built-in variant, as the README's table (regenerated here) says.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from raeflow.artifact import TrainedModel
from raeflow.capability_table import BEGIN, END, markdown
from raeflow.data import load_eval_data
from raeflow.embed.encoder import Encoder
from raeflow.evaluate import evaluate, tasks_for
from raeflow.io import save_model
from raeflow.models import capabilities as cap
from raeflow.models.base import Autoencoder, mlp
from raeflow.registry import list_variants, register_model, unregister_model
from raeflow.serve.service import ModelService, ServiceError, handle_sync

from test_contract import ContractChecks


class _Toy(Autoencoder):
    """A tiny generator with an encoder: trains as a small AE, offers codes and samples but no reconstructions."""

    capabilities = frozenset({cap.ENCODE, cap.GENERATE})

    def __init__(self, input_shape=(1, 8, 8), latent_dim: int = 4):
        super().__init__(input_shape, latent_dim)
        self.encoder = mlp([self.input_dim, 32, self.latent_dim])  # (B, 64) -> (B, 4)
        self.decoder = mlp([self.latent_dim, 32, self.input_dim])  # (B, 4) -> (B, 64) logits

    def _encode(self, x):
        return self.encoder(x.flatten(1))

    def _decode_raw(self, z):
        return self.decoder(z)

    def sample(self, n, generator=None):
        z = torch.randn(n, self.latent_dim, generator=generator)
        return torch.sigmoid(self._decode_raw(z)).reshape(n, *self.input_shape)


@pytest.fixture
def toy_variant():
    """Registers ``toy`` (ENCODE + GENERATE) for one test only, then removes it again: registered after
    collection, it can never enter another test's ``list_variants()`` parametrisation."""
    cls = register_model("toy", "a two-capability toy for the capability tests")(type("Toy", (_Toy,), {}))
    yield cls
    unregister_model("toy")
    assert "toy" not in list_variants()


@pytest.fixture
def toy_encoder_only():
    """The same toy without GENERATE."""
    cls = register_model("toy-enc", "the toy without a generator")(
        type("ToyEnc", (_Toy,), {"capabilities": frozenset({cap.ENCODE})}))
    yield cls
    unregister_model("toy-enc")


def _saved(cls, tmp_path: Path) -> TrainedModel:
    torch.manual_seed(0)
    model = cls().eval()
    d = save_model(model, tmp_path / "model", data={"name": "digits", "kind": "image", "input_shape": [1, 8, 8],
                                                    "classes": [str(i) for i in range(10)]})
    return TrainedModel.load(d)


def test_toy_gets_exactly_what_its_capabilities_allow(toy_variant, tmp_path):
    art = _saved(toy_variant, tmp_path)
    assert art.capabilities == {cap.ENCODE, cap.GENERATE} and art.latent_dim == 4 and art.input.mode == "L"
    svc = ModelService(art)
    assert svc.endpoints == ["encode", "generate"]  # no decoder: no /reconstruct, /interpolate, /grid
    x = load_eval_data("digits").x[:3, 0]
    codes = handle_sync(svc, "encode", {"images": x.tolist()})["codes"]
    assert np.asarray(codes).shape == (3, 4)
    a, b = handle_sync(svc, "generate", {"n": 2, "seed": 5}), handle_sync(svc, "generate", {"n": 2, "seed": 5})
    assert a == b and np.asarray(a["images"]).shape == (2, 8, 8)
    for endpoint in ("reconstruct", "denoise", "interpolate", "grid", "classify", "search"):
        with pytest.raises(ServiceError) as e:
            handle_sync(svc, endpoint, {"images": x.tolist()})
        assert e.value.status == 404 and "/encode, /generate" in e.value.message

    assert tasks_for(art.capabilities, is_image=True, labelled=True) == ["probe", "parzen", "retrieval"]
    res = evaluate(art, "digits", opts={"parzen_samples": 500}, log=lambda s: None)
    assert list(res["tasks"]) == ["probe", "parzen", "retrieval"]
    assert 0.1 < res["tasks"]["probe"]["knn_accuracy"] <= 1 and np.isfinite(res["tasks"]["parzen"]["log_likelihood"])

    enc = Encoder(art)
    out = enc({"id": ["a", "b"], "x": x[:2].reshape(2, -1), "error": [None, "unreadable"]})
    assert out.schema.names == ["id", "embedding", "label", "source", "error"]  # no logvar, no codes
    assert out.column("embedding").type.list_size == 4 and out.column("embedding").null_count == 1


def test_removing_a_capability_removes_its_endpoint_and_task(toy_encoder_only, tmp_path):
    art = _saved(toy_encoder_only, tmp_path)
    assert ModelService(art).endpoints == ["encode"]
    assert tasks_for(art.capabilities, is_image=True, labelled=True) == ["probe", "retrieval"]
    with pytest.raises(ValueError, match="needs capabilities"):
        evaluate(art, "digits", tasks=["parzen"], log=lambda s: None)


class TestToyContract(ContractChecks):
    """The contract every built-in variant keeps, run on the toy through the same tester mixin."""

    @pytest.fixture
    def variant(self, toy_variant) -> str:
        return "toy"


def test_readme_table_matches_the_declarations():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), readme, re.S)
    assert found, "README.md lost its capability table markers"
    assert found.group(0) == markdown(), "README's capability table is stale: python -m raeflow.capability_table"


def test_serve_and_eval_agree_on_every_builtin_variant():
    """Each capability an eval task measures is one serve also offers, and the reverse, on every variant."""
    from raeflow.capability_table import rows

    from raeflow.evaluate import TASKS

    pairs = {"denoise": "denoise", "generate": "parzen", "classify": "classify", "reconstruct": "reconstruction"}
    for variant, caps, endpoints, _ in rows():
        applicable = [n for n, t in TASKS.items() if t.applies(frozenset(caps), True, True)]  # --task may ask
        for endpoint, task in pairs.items():
            assert (endpoint in endpoints) == (task in applicable), (variant, endpoint, task, endpoints, applicable)
