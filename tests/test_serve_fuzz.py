"""Fuzzing the Serve application over real HTTP: no body, however malformed, gets a 5xx or kills the replica.

Schema-driven: the request fields come from the app's own /openapi.json, filled with hypothesis-generated
values that are mostly wrong in type, shape, range or encoding, and sometimes right; plus arbitrary JSON
documents and raw bytes. A bounded number of examples keeps it to a few seconds.
"""
from __future__ import annotations

import base64
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.ray

ENDPOINTS = ["encode", "reconstruct", "denoise", "generate", "interpolate", "grid", "search", "nope"]
MODELS = ["dae", "vae2d", "missing"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=40)
pixels = st.floats(-0.5, 1.5, allow_nan=False) | st.sampled_from([0.0, 0.5, 1.0, float("nan"), float("inf")])


@st.composite
def images(draw):
    """An image-ish value: arrays of nearly-right or wrong shapes, base64 junk or PNG-looking bytes."""
    kind = draw(st.sampled_from(["array", "array", "png", "junk"]))
    if kind == "array":
        h, w = draw(st.sampled_from([(8, 8), (8, 8), (7, 8), (1, 1), (0, 0)]))
        rows = [[draw(pixels) for _ in range(w)] for _ in range(h)]
        return draw(st.sampled_from([rows, [rows], [[rows]]]))
    if kind == "png":
        head = b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=64))
        return base64.b64encode(head).decode()
    return draw(json_values)


@st.composite
def schema_bodies(draw, schemas):
    """A dict over some of an endpoint's documented fields (and now and then an undocumented one)."""
    props = draw(st.sampled_from(schemas))
    body = {}
    for name in draw(st.lists(st.sampled_from(sorted(props)), unique=True, max_size=len(props))):
        if name in ("images",):
            body[name] = draw(st.lists(images(), max_size=4) | json_values)
        elif name in ("a", "b"):
            body[name] = draw(images() | st.lists(pixels, max_size=3))
        elif name == "z":
            body[name] = draw(st.lists(st.lists(pixels, max_size=3), max_size=3) | json_values)
        elif name == "format":
            body[name] = draw(st.sampled_from(["array", "png", "jpeg", 1]))
        elif name in ("n", "steps", "k", "seed"):
            body[name] = draw(st.integers(-3, 300) | st.sampled_from([2**64, 1.5, "3"]))
        else:
            body[name] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def openapi_fields(serve_url) -> list[dict]:
    spec = httpx.get(f"{serve_url}/openapi.json", timeout=30).json()
    return [s["properties"] for s in spec["components"]["schemas"].values()
            if s.get("type") == "object" and "properties" in s and not s.get("title", "").endswith("Error")]


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_fuzz_schema_bodies(serve_url, openapi_fields):
    assert any("images" in f for f in openapi_fields) and any("steps" in f for f in openapi_fields)
    with httpx.Client(base_url=serve_url, timeout=60) as http:

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(model=st.sampled_from(MODELS), endpoint=st.sampled_from(ENDPOINTS),
               body=schema_bodies(openapi_fields))
        def run(model, endpoint, body):
            text = json.dumps(body)  # NaN / Infinity literals included: Python's JSON reader accepts them
            check(http.post(f"/{model}/{endpoint}", content=text, headers={"content-type": "application/json"}))

        run()
        assert http.get("/healthz").status_code == 200


def test_fuzz_arbitrary_json_and_bytes(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as http:

        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(path=st.sampled_from(["/dae/denoise", "/vae2d/generate", "/vae2d/interpolate", "/dae/encode"]),
               body=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
               ctype=st.sampled_from(["application/json", "text/plain", ""]))
        def run(path, body, ctype):
            check(http.post(path, content=body, headers={"content-type": ctype} if ctype else {}))

        run()
        assert http.get("/healthz").status_code == 200
