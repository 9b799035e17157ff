"""Every model endpoint, declared once: its request model, the capability it needs, and how it is answered.

An :class:`Endpoint` names the capabilities (``raeflow.models.capabilities``) a model must declare for the route
to exist, an optional extra condition (``/grid`` wants a 2-D code), the reason given when a model lacks it, and
``plan``: parse and check one request, then say which batched model call it needs and how to render its
result. :data:`ENDPOINTS` is the whole table; ``ModelService.endpoints`` and the HTTP routes (``api.py``) are
generated from it, so a new endpoint is one entry here and nothing else.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from raeflow.models import capabilities as cap
from raeflow.serve.errors import ServiceError, bad
from raeflow.serve.schemas import (DECIMALS, GenerateRequest, GridRequest, ImagesRequest, InterpolateRequest,
                                   Request, SearchRequest)

#: a :class:`raeflow.serve.service.ModelService` (not imported: the service imports this table)
ModelService = Any

#: the batched model calls a plan may ask for (``ModelService.run``): one call serves many requests
BATCHED_OPS = ("encode", "reconstruct", "denoise", "decode", "predict")


@dataclass
class Plan:
    """For one request: the batched call it needs (``op`` on ``x``) and ``finish``, which turns that call's output
    into the answer (a dict) or into the next Plan (interpolating images: encode both ends, then decode)."""

    op: str | None  # one of BATCHED_OPS, or None when the answer needs no batched call
    x: np.ndarray | None
    finish: Callable[[np.ndarray | None], "dict[str, Any] | Plan"]


@dataclass(frozen=True)
class Endpoint:
    name: str
    request: type[Request]
    needs: frozenset[str]  # capabilities the model must declare
    summary: str  # the route's OpenAPI summary
    why_not: str  # said when a model lacks ``needs``
    plan: Callable[[ModelService, Any], Plan]
    #: a further condition on the served model (None: ``needs`` decides), with its reason
    extra: Callable[[ModelService], str | None] | None = field(default=None)
    #: the answer is the batched call's output as one array (codes, images): it can be answered as ``.npy``
    array_answer: bool = False

    @property
    def takes_batches(self) -> bool:
        """Whether a binary request (a ``.npy`` batch of inputs) can stand in for the JSON body's images."""
        return issubclass(self.request, ImagesRequest)

    def refusal(self, svc: ModelService) -> str | None:
        """None when ``svc`` supports this endpoint; else why not."""
        if not self.needs <= svc.capabilities:
            return self.why_not
        return self.extra(svc) if self.extra else None


def new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _codes(z: np.ndarray) -> list:
    return np.round(z.astype(np.float64), DECIMALS).tolist()


# ------------------------------------------------------------------------------------------------ plans
def _encode(svc: ModelService, req: ImagesRequest) -> Plan:
    inp = svc.inputs(req)
    if req.grid:
        raise bad("\"grid\" applies to endpoints that answer images, not to /encode")
    return Plan("encode", inp.x, lambda z: {"codes": _codes(z)})


def _images_to_images(op: str) -> Callable[[ModelService, ImagesRequest], Plan]:
    def plan(svc: ModelService, req: ImagesRequest) -> Plan:
        inp = svc.inputs(req)
        return Plan(op, inp.x, lambda y: svc.render_images(y, req.format, inp.squeeze, req.grid))

    return plan


def _classify(svc: ModelService, req: ImagesRequest) -> Plan:
    inp = svc.inputs(req)
    if req.grid:
        raise bad("\"grid\" applies to endpoints that answer images, not to /classify")

    def finish(logits: np.ndarray) -> dict[str, Any]:
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        names = svc.classes or [str(i) for i in range(p.shape[1])]
        return {"labels": [names[i] for i in p.argmax(1)], "classes": names,
                "probabilities": np.round(p.astype(np.float64), DECIMALS).tolist()}

    return Plan("predict", inp.x, finish)


def _generate(svc: ModelService, r: GenerateRequest) -> Plan:
    svc.check_format(r.format)
    if r.z is not None:
        if cap.RECONSTRUCT not in svc.capabilities:
            raise bad(f"model {svc.name!r} cannot decode given codes (it has no decoder); leave \"z\" out to sample")
        z = svc.codes(r.z)
        return Plan("decode", z, lambda y: svc.render_images(y, r.format, True, r.grid))
    if r.n > svc.max_samples:
        raise bad(f"n: model {svc.name!r} samples one position at a time (autoregressive), so /generate takes at "
                  f"most n={svc.max_samples} per request; got {r.n}")
    seed = new_seed() if r.seed is None else r.seed
    # Sampling is per request (its own seeded generator); not batched.
    y = svc.sample(r.n, seed)
    return Plan(None, None, lambda _: {**svc.render_images(y, r.format, True, r.grid), "seed": seed})


def _interpolate(svc: ModelService, r: InterpolateRequest) -> Plan:
    svc.check_format(r.format)
    if r.kind == "code":
        za, zb = svc.code(r.a, "a"), svc.code(r.b, "b")
        z = svc.interpolation_codes(za, zb, r.steps)
        return Plan("decode", z, lambda y: svc.render_images(y, r.format, True, r.grid, cols=r.steps))
    (a, sq_a), (b, sq_b) = svc.one_input(r.a, r.format, "a"), svc.one_input(r.b, r.format, "b")
    # Encode both ends (a batched call), then decode the segment between their codes (another).
    return Plan("encode", np.stack([a, b]), lambda zab: Plan(
        "decode", svc.interpolation_codes(zab[0], zab[1], r.steps),
        lambda y: svc.render_images(y, r.format, sq_a and sq_b, r.grid, cols=r.steps)))


def _grid(svc: ModelService, r: GridRequest) -> Plan:
    svc.check_format(r.format)
    z = svc.grid_codes(r.steps, r.span)
    return Plan("decode", z, lambda y: {**svc.render_images(y, r.format, True, r.grid, cols=r.steps),
                                        "codes": _codes(z)})


def _search(svc: ModelService, r: SearchRequest) -> Plan:
    inp = svc.inputs(r)
    if r.grid:
        raise bad("\"grid\" applies to endpoints that answer images, not to /search")
    return Plan("encode", inp.x, lambda codes: svc.search(codes, r.k, r.index))


def _two_d(svc: ModelService) -> str | None:
    return None if svc.latent_dim == 2 else f"its latent space has {svc.latent_dim} dimensions, not 2"


def _has_index(svc: ModelService) -> str | None:
    return None if svc.indexes else "the server has no --index of embeddings made by this model"


def _decodes_codes(svc: ModelService) -> str | None:
    return None if cap.RECONSTRUCT in svc.capabilities else "it has no decoder from codes to images"


ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (
    Endpoint("encode", ImagesRequest, frozenset({cap.ENCODE}), "Images (or documents) -> latent codes",
             "it has no encoder", _encode, array_answer=True),
    Endpoint("reconstruct", ImagesRequest, frozenset({cap.RECONSTRUCT}), "Images -> their reconstructions",
             "it does not reconstruct its inputs", _images_to_images("reconstruct"), array_answer=True),
    Endpoint("denoise", ImagesRequest, frozenset({cap.DENOISE}), "Noisy images -> cleaned images (denoising models)",
             "it was not trained as a denoiser (no corruption)", _images_to_images("denoise"), array_answer=True),
    Endpoint("classify", ImagesRequest, frozenset({cap.CLASSIFY}), "Images -> class labels and probabilities",
             "it has no classification head", _classify),
    Endpoint("generate", GenerateRequest, frozenset({cap.GENERATE}),
             "Samples from the prior (seeded), or decoded codes z (generators)", "it has no prior to sample from",
             _generate),
    Endpoint("interpolate", InterpolateRequest, frozenset({cap.GENERATE, cap.ENCODE}),
             "Decoded images on the segment between two images' or codes' codes",
             "it has no prior (not a generator) or no encoder", _interpolate, _decodes_codes),
    Endpoint("grid", GridRequest, frozenset({cap.GENERATE, cap.RECONSTRUCT}),
             "The decoded 2-D latent manifold (generators with 2-D codes)", "it has no prior (not a generator)",
             _grid, _two_d),
    Endpoint("search", SearchRequest, frozenset({cap.ENCODE}),
             "The k nearest rows of an --index embeddings directory to each query",
             "it has no encoder", _search, _has_index),
)}


def endpoints_for(capabilities: frozenset[str], latent_dim: int, with_index: bool = False) -> list[str]:
    """The endpoints a model with these capabilities gets (the README's table is generated from this)."""
    from types import SimpleNamespace

    probe = SimpleNamespace(capabilities=capabilities, latent_dim=latent_dim, indexes=[None] if with_index else [])
    return [n for n, e in ENDPOINTS.items() if e.refusal(probe) is None]  # type: ignore[arg-type]


def parse_request(endpoint: Endpoint, body: Any) -> Request:
    """Validate a JSON body (a dict) into the endpoint's request model; pydantic errors become one 422 message."""
    from pydantic import ValidationError

    from raeflow.serve.schemas import validation_message

    if isinstance(body, endpoint.request):
        return body
    try:
        return endpoint.request.model_validate(body)
    except ValidationError as e:
        raise bad(f"invalid /{endpoint.name} request: {validation_message(e.errors())}") from None


def plan(svc: ModelService, name: str, body: Any) -> Plan:
    """Parse and check one request for endpoint ``name``; return the batched call it needs."""
    endpoint = ENDPOINTS.get(name)
    if endpoint is None:
        raise ServiceError(404, f"no endpoint /{name}; endpoints: {', '.join('/' + n for n in ENDPOINTS)}")
    svc.require(name)
    return endpoint.plan(svc, parse_request(endpoint, body))
