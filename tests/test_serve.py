"""Serving: the plain service class (no Ray), then the Ray Serve application over real HTTP on 127.0.0.1.

The models (a 2-D VAE and a DAE on 8x8 digits) and the Serve application come from session fixtures in
conftest.py, started once for this file and test_serve_fuzz.py.
"""
from __future__ import annotations

import base64
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from raeflow.serve.service import (MAX_BODY_BYTES, MAX_ITEMS, ModelService, ServiceError, Stats, decode_png,
                                   encode_png, handle_sync, run_jobs, tile)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """64 clean test digits (64, 8, 8) in [0, 1]."""
    from raeflow.data import load_eval_data

    return load_eval_data("digits").x[:64, 0].astype(np.float64)


def noisy(x: np.ndarray, level: float = 0.25, seed: int = 0) -> np.ndarray:
    """Masking noise, the corruption the DAE was trained with."""
    return np.where(np.random.default_rng(seed).random(x.shape) < level, 0.0, x)


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_array(s: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))), dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def vae(serve_models) -> ModelService:
    return ModelService.load(serve_models["vae2d"])


@pytest.fixture(scope="module")
def dae(serve_models) -> ModelService:
    return ModelService.load(serve_models["dae"])


# ------------------------------------------------------------------------------- the plain class, no Ray
def test_service_describes_capabilities(vae, dae):
    assert vae.name == "vae2d" and dae.name == "dae"
    assert vae.endpoints == ["encode", "reconstruct", "generate", "interpolate", "grid"]
    assert dae.endpoints == ["encode", "reconstruct", "denoise"]
    d = dae.describe()
    assert (d["variant"], d["input_shape"], d["latent_dim"], d["capabilities"]) == \
        ("dae", [1, 8, 8], 24, ["denoise", "encode", "reconstruct"])
    assert vae.describe()["latent_dim"] == 2


def test_service_denoise_lowers_error(dae, digits):
    x = noisy(digits)
    y = np.asarray(handle_sync(dae, "denoise", {"images": x.tolist()})["images"])
    assert y.shape == (64, 8, 8)
    assert ((y - digits) ** 2).mean() < 0.8 * ((x - digits) ** 2).mean()


def test_service_generate_is_seeded(vae):
    a = handle_sync(vae, "generate", {"n": 5, "seed": 3})
    b = handle_sync(vae, "generate", {"n": 5, "seed": 3})
    c = handle_sync(vae, "generate", {"n": 5, "seed": 4})
    assert a == b and a["seed"] == 3 and np.asarray(a["images"]).shape == (5, 8, 8)
    assert np.abs(np.asarray(a["images"]) - np.asarray(c["images"])).max() > 1e-3
    fresh = handle_sync(vae, "generate", {"n": 1})
    assert isinstance(fresh["seed"], int)  # the seed drawn is answered, so the sample can be repeated


def test_service_channel_axis_round_trips(dae, digits):
    flat = handle_sync(dae, "reconstruct", {"images": digits[:2].tolist()})["images"]
    chw = handle_sync(dae, "reconstruct", {"images": digits[:2, None].tolist()})["images"]
    assert np.asarray(flat).shape == (2, 8, 8) and np.asarray(chw).shape == (2, 1, 8, 8)
    np.testing.assert_allclose(np.asarray(chw)[:, 0], flat)


@pytest.mark.parametrize("body, status, words", [
    ({"images": [[[0.5] * 8] * 7]}, 422, "shape [7, 8]"),
    ({"images": [[[1.5] * 8] * 8]}, 422, "[0, 1]"),
    ({"images": [[[float("nan")] * 8] * 8]}, 422, "NaN"),
    ({"images": [[[None] * 8] * 8]}, 422, "null"),
    ({"images": [[[0.1, [0.2]]]]}, 422, "rectangular"),
    ({"images": ["not base64!"], "format": "png"}, 422, "base64"),
    ({"images": [base64.b64encode(b"GIF89a....").decode()], "format": "png"}, 422, "PNG"),
    ({"images": [[[0.5] * 8] * 8], "documents": ["x"]}, 422, "exactly one"),
    ({"images": []}, 422, "empty"),
    ({"image": [[[0.5] * 8] * 8]}, 422, "image"),
    ({"images": [[[0.5] * 8] * 8], "grid": "maybe"}, 422, "grid"),
    ({"documents": ["some text"]}, 422, "vectoriser"),
])
def test_service_rejects_bad_images(dae, body, status, words):
    with pytest.raises(ServiceError) as e:
        handle_sync(dae, "denoise", body)
    assert e.value.status == status and words in e.value.message


def test_service_rejects_unsupported_and_out_of_range(dae, vae):
    with pytest.raises(ServiceError) as e:
        handle_sync(dae, "generate", {"n": 2})
    assert e.value.status == 404 and "no prior" in e.value.message and "/denoise" in e.value.message
    with pytest.raises(ServiceError) as e:
        handle_sync(vae, "denoise", {"images": [[[0.5] * 8] * 8]})
    assert e.value.status == 404 and "not trained as a denoiser" in e.value.message
    for body, words in [({"n": 0}, "n:"), ({"n": MAX_ITEMS + 1}, "n:"), ({"z": [[0.0, 0.0, 0.0]]}, "2 numbers"),
                        ({"z": [[0.0, float("inf")]]}, "infinite"), ({"z": []}, "empty"), ({"seed": -1}, "seed")]:
        with pytest.raises(ServiceError) as e:
            handle_sync(vae, "generate", body)
        assert e.value.status == 422 and words in e.value.message, body
    with pytest.raises(ServiceError) as e:
        handle_sync(vae, "interpolate", {"a": [0.0, 0.0], "b": [0.0, 0.0], "steps": 1, "kind": "code"})
    assert "steps" in e.value.message


def test_png_codec_and_tile():
    rng = np.random.default_rng(0)
    img = rng.random((1, 8, 8)).astype(np.float32)
    back = decode_png(encode_png(img), (1, 8, 8), "x")
    assert back.shape == (1, 8, 8) and np.abs(back - img).max() <= 0.5 / 255 + 1e-6
    rgb = rng.random((3, 5, 7)).astype(np.float32)
    assert decode_png(encode_png(rgb), (3, 5, 7), "x").shape == (3, 5, 7)
    with pytest.raises(ServiceError, match="PNG is 7x5"):
        decode_png(encode_png(rgb), (3, 7, 5), "x")
    assert tile(np.zeros((10, 1, 8, 8), np.float32)).shape == (1, 3 * 9 - 1, 4 * 9 - 1)  # 4 columns, 3 rows
    assert tile(np.zeros((5, 1, 8, 8), np.float32), cols=5).shape == (1, 8, 5 * 9 - 1)


def test_run_jobs_batches_per_model_and_op(dae, vae, digits):
    services = {"dae": dae, "vae2d": vae}
    x = digits[:, None].astype(np.float32)
    jobs = [("dae", "denoise", x[:3]), ("vae2d", "encode", x[3:4]), ("dae", "denoise", x[4:9]),
            ("vae2d", "decode", np.zeros((2, 2), np.float32))]
    stats = Stats()
    out = run_jobs(services, jobs, stats)
    assert [o.shape for o in out] == [(3, 1, 8, 8), (1, 2), (5, 1, 8, 8), (2, 1, 8, 8)]
    np.testing.assert_allclose(out[2], dae.run("denoise", x[4:9]), atol=1e-6)  # same answer as unbatched
    assert (stats.requests, stats.batches, stats.items, stats.max_batch) == (4, 3, 11, 2)
    # A failing group answers its exception to its own jobs only.
    bad = run_jobs(services, [("dae", "denoise", x[:1]), ("vae2d", "decode", np.zeros((1, 5), np.float32))])
    assert bad[0].shape == (1, 1, 8, 8) and isinstance(bad[1], Exception)


def test_cli_parsers_and_options(tmp_path, serve_models, monkeypatch):
    from raeflow.cli.serve_cmd import parse_indexes, parse_replicas
    from raeflow.serve.options import ServeOptions
    from raeflow.serve.run import ServerSpec, direct_ingress_env, stop

    assert parse_indexes(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    with pytest.raises(ValueError, match="NAME=EMBEDDINGS_DIR"):
        parse_indexes(["nodir"])
    assert parse_replicas("auto") == "auto" and parse_replicas("3") == 3
    with pytest.raises(ValueError):
        parse_replicas("0")
    auto = ServeOptions(replicas="auto", max_replicas=4).deployment_options()
    assert auto["num_replicas"] == "auto" and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["max_ongoing_requests"] >= ServeOptions().max_batch_size
    assert ServeOptions(replicas=2).deployment_options()["num_replicas"] == 2
    dup = tmp_path / "x" / "dae"
    dup.parent.mkdir()
    dup.symlink_to(serve_models["dae"])
    with pytest.raises(ValueError, match="both be served as 'dae'"):
        ServerSpec(models=[serve_models["dae"], str(dup)]).app_config()
    with pytest.raises(FileNotFoundError):
        ServerSpec(models=[str(tmp_path / "missing")]).app_config()
    assert direct_ingress_env(9000, 2)["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "9000"
    assert direct_ingress_env(9000, 2)["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "9002"  # ports 9000, 9001
    # Direct ingress by default on a Ray started here; the proxy on a joined cluster; direct asked of a joined
    # cluster is refused (its flags are read when Ray starts).
    from raeflow.raycluster import apply_env
    from raeflow.serve.run import use_direct_ingress

    # Ray's environment first: importing Ray before it (as monkeypatching "ray.…" does) would leave the Ray this
    # test session starts later listening on every interface (test_no_socket_beyond_loopback caught it).
    apply_env()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    assert use_direct_ingress(ServerSpec(models=[])) is True
    assert use_direct_ingress(ServerSpec(models=[], direct_ingress=False)) is False
    assert use_direct_ingress(ServerSpec(models=[], address="10.0.0.1:6379")) is False
    with pytest.raises(ValueError, match="--proxy"):
        use_direct_ingress(ServerSpec(models=[], address="10.0.0.1:6379", direct_ingress=True))
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    assert use_direct_ingress(ServerSpec(models=[])) is False
    monkeypatch.setenv("RAEFLOW_SERVE_STATE", str(tmp_path / "state"))
    with pytest.raises(FileNotFoundError, match="no detached raeflow server"):
        stop(12345)


def test_search_matches_indexes_to_their_model(dae, vae, serve_index, digits):
    from raeflow.serve.search import load_indexes, search_index

    dae.indexes, vae.indexes = [], []  # module-scoped objects: start clean
    assert "search" not in dae.endpoints  # no index yet: no /search
    indexes = load_indexes([{"name": "digits", "path": serve_index}], {"dae": dae, "vae2d": vae})
    assert indexes["digits"].models == ["dae"]  # embedded by the DAE: the VAE's codes are another space
    assert "search" in dae.endpoints and "search" not in vae.endpoints
    codes = dae.run("encode", digits[:3, None].astype(np.float32))
    out = search_index(indexes, dae, codes, 4, None)
    assert out["rows"] == 300 and len(out["results"]) == 3 and len(out["results"][0]) == 4
    assert [r[0]["id"] for r in out["results"]] == ["digits:test:0", "digits:test:1", "digits:test:2"]
    assert out["results"][0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ServiceError, match="unknown index 'nope'"):
        search_index(indexes, dae, codes, 4, "nope")
    with pytest.raises(ServiceError, match="does not support /search"):
        search_index(indexes, vae, codes, 4, None)


# ------------------------------------------------------------------- binary (.npy) batches, plain app, no Ray
NPY = "application/x-npy"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def npy_array(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


@pytest.fixture(scope="module")
def plain_client(serve_models, serve_index):
    """The plain FastAPI app (no Ray) over its own services, the DAE with the digits index."""
    from fastapi.testclient import TestClient

    from raeflow.serve.api import DirectBackend, build_app
    from raeflow.serve.search import load_indexes

    services = {n: ModelService.load(serve_models[n]) for n in ("dae", "vae2d")}
    load_indexes([{"name": "digits", "path": serve_index}], services)
    with TestClient(build_app(DirectBackend(services))) as c:
        yield c


def test_npy_batch_answers_what_json_answers(plain_client, digits):
    x = noisy(digits[:32], seed=3).astype(np.float32)
    js = np.asarray(plain_client.post("/dae/denoise", json={"images": x.tolist()}).json()["images"])
    r = plain_client.post("/dae/denoise", content=npy_bytes(x), headers={"content-type": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    y = npy_array(r.content)
    assert y.dtype == np.float32 and y.shape == (32, 1, 8, 8)  # exact float32, the model's full shape
    np.testing.assert_allclose(y[:, 0], js, atol=1e-6)  # JSON rounds to 6 decimals
    # uint8 pixels are bytes / 255, as training reads them; the channel axis may be sent.
    u8 = np.rint(x * 255).astype(np.uint8)[:, None]
    y8 = npy_array(plain_client.post("/dae/denoise", content=npy_bytes(u8), headers={"content-type": NPY}).content)
    y8_ref = npy_array(plain_client.post("/dae/denoise", content=npy_bytes(u8 / np.float32(255)),
                                         headers={"content-type": NPY}).content)
    np.testing.assert_allclose(y8, y8_ref, atol=1e-6)
    # Accept: application/json -> the JSON answer of the same batch.
    r = plain_client.post("/dae/denoise", content=npy_bytes(x),
                          headers={"content-type": NPY, "accept": "application/json"})
    assert r.headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.asarray(r.json()["images"]), js, atol=0)
    codes = npy_array(plain_client.post("/vae2d/encode", content=npy_bytes(digits[:5]),
                                        headers={"content-type": NPY}).content)
    want = plain_client.post("/vae2d/encode", json={"images": digits[:5].tolist()}).json()["codes"]
    assert codes.shape == (5, 2)
    np.testing.assert_allclose(codes, want, atol=1e-6)


def test_npy_search_takes_options_from_the_query(plain_client, digits):
    r = plain_client.post("/dae/search?k=2", content=npy_bytes(digits[:3]), headers={"content-type": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"  # neighbours: structured
    assert [h[0]["id"] for h in r.json()["results"]] == [f"digits:test:{i}" for i in range(3)]
    assert all(len(h) == 2 for h in r.json()["results"])


@pytest.mark.parametrize("body, query, headers, status, words", [
    (b"PK\x03\x04 not npy", "", {}, 422, "not a .npy body"),
    ("object", "", {}, 422, "dtype object"),
    ("int64", "", {}, 422, "dtype int64"),
    ("short", "", {}, 422, "the body holds"),
    ("wide", "", {}, 422, "does not fit model 'dae'"),
    ("many", "", {}, 422, "1..256 items"),
    ("range", "", {}, 422, "[0, 1]"),
    ("nan", "", {}, 422, "NaN"),
    ("ok", "?images=1", {}, 422, "are its body"),
    ("ok", "?steps=3", {}, 422, "steps"),
    ("ok", "?grid=true", {}, 422, "grid"),
    ("ok", "", {"accept": NPY}, 200, ""),
])
def test_npy_bad_batches_are_clear_4xx(plain_client, body, query, headers, status, words):
    arrays = {"object": np.array([None, {"a": 1}], dtype=object), "int64": np.zeros((1, 8, 8), np.int64),
              "wide": np.zeros((2, 9, 9), np.float32), "many": np.zeros((257, 8, 8), np.uint8),
              "range": np.full((1, 8, 8), 1.5, np.float32), "nan": np.full((1, 8, 8), np.nan, np.float32),
              "ok": np.zeros((2, 8, 8), np.float32)}
    if isinstance(body, str) and body == "short":
        content = npy_bytes(np.zeros((4, 8, 8), np.float32))[:-10]
    elif isinstance(body, str):
        a = arrays[body]
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=True)  # the object array pickles: the server must refuse, never unpickle
        content = buf.getvalue()
    else:
        content = body
    r = plain_client.post(f"/dae/denoise{query}", content=content, headers={"content-type": NPY, **headers})
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["error"], r.json()


def test_npy_negotiation_and_routes(plain_client, digits):
    x = npy_bytes(digits[:2])
    r = plain_client.post("/vae2d/generate", content=x, headers={"content-type": NPY})
    assert r.status_code == 415 and "/denoise" in r.json()["error"] and "JSON body only" in r.json()["error"]
    r = plain_client.post("/dae/search", content=x, headers={"content-type": NPY, "accept": NPY})
    assert r.status_code == 406 and "answers JSON" in r.json()["error"]  # neighbours are not one array
    r = plain_client.post("/nope/denoise", content=x, headers={"content-type": NPY})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = plain_client.post("/dae/generate", content=x, headers={"content-type": NPY})
    assert r.status_code == 415
    r = plain_client.post("/vae2d/denoise", content=x, headers={"content-type": NPY})
    assert r.status_code == 404 and "denoiser" in r.json()["error"]
    # The body limit holds for binary bodies too.
    big = b"\x93NUMPY" + b" " * (MAX_BODY_BYTES + 1)
    r = plain_client.post("/dae/denoise", content=big, headers={"content-type": NPY})
    assert r.status_code == 413
    spec = plain_client.get("/openapi.json").json()["paths"]
    assert NPY in spec["/{model}/denoise"]["post"]["requestBody"]["content"]
    assert "application/json" in spec["/{model}/denoise"]["post"]["requestBody"]["content"]
    assert NPY in spec["/{model}/denoise"]["post"]["responses"]["200"]["content"]
    assert NPY not in spec["/{model}/generate"]["post"]["requestBody"]["content"]


# ----------------------------------------------------------------------------- Ray Serve, over real HTTP
@pytest.fixture(scope="module")
def http(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c


@pytest.mark.ray
def test_health_models_and_openapi(http):
    assert http.get("/healthz").json() == {"status": "ok", "models": ["dae", "vae2d"]}
    models = {m["name"]: m for m in http.get("/models").json()["models"]}
    assert models["vae2d"]["endpoints"] == ["encode", "reconstruct", "generate", "interpolate", "grid"]
    assert models["dae"]["endpoints"] == ["encode", "reconstruct", "denoise", "search"]
    assert models["dae"]["input_shape"] == [1, 8, 8] and models["dae"]["latent_dim"] == 24
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/{model}/denoise", "/{model}/generate", "/{model}/grid", "/healthz", "/models"} <= set(paths)
    assert http.get("/docs").status_code == 200


@pytest.mark.ray
def test_http_denoise_lowers_error(http, digits):
    x = noisy(digits, seed=1)
    r = http.post("/dae/denoise", json={"images": x.tolist()})
    assert r.status_code == 200
    y = np.asarray(r.json()["images"])
    assert y.shape == (64, 8, 8)
    err_noisy, err_denoised = ((x - digits) ** 2).mean(), ((y - digits) ** 2).mean()
    assert err_denoised < 0.8 * err_noisy, (err_denoised, err_noisy)
    # The same through PNGs: 8-bit in and out, so the same figures within quantisation.
    r = http.post("/dae/denoise", json={"images": [png_b64(i) for i in x[:16]], "format": "png", "grid": True})
    assert r.status_code == 200
    ys = np.stack([png_array(s) for s in r.json()["images"]])
    assert ys.shape == (16, 8, 8) and np.abs(ys - y[:16]).max() < 0.02
    assert png_array(r.json()["grid"]).shape == (4 * 9 - 1, 4 * 9 - 1)


@pytest.mark.ray
def test_http_npy_batch_through_the_batched_replica(http, digits):
    """A .npy batch through Serve's replica (its batched model calls): the same answer as the JSON request."""
    x = noisy(digits, seed=2).astype(np.float32)
    r = http.post("/dae/denoise", content=npy_bytes(x), headers={"content-type": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    js = np.asarray(http.post("/dae/denoise", json={"images": x.tolist()}).json()["images"])
    np.testing.assert_allclose(npy_array(r.content)[:, 0], js, atol=1e-6)


@pytest.mark.ray
def test_http_generate_is_reproducible(http):
    a = http.post("/vae2d/generate", json={"n": 6, "seed": 11}).json()
    b = http.post("/vae2d/generate", json={"n": 6, "seed": 11}).json()
    c = http.post("/vae2d/generate", json={"n": 6, "seed": 12}).json()
    ia, ic = np.asarray(a["images"]), np.asarray(c["images"])
    assert ia.shape == (6, 8, 8) and 0 <= ia.min() and ia.max() <= 1
    assert a == b
    assert np.abs(ia - ic).max() > 1e-3
    z = [[0.0, 0.0], [1.0, -1.0]]
    d = http.post("/vae2d/generate", json={"z": z, "format": "png"}).json()
    assert len(d["images"]) == 2 and png_array(d["images"][0]).shape == (8, 8)


@pytest.mark.ray
def test_http_interpolation_ends_are_reconstructions(http, digits):
    a, b = digits[0].tolist(), digits[1].tolist()
    path = np.asarray(http.post("/vae2d/interpolate", json={"a": a, "b": b, "steps": 7}).json()["images"])
    rec = np.asarray(http.post("/vae2d/reconstruct", json={"images": [a, b]}).json()["images"])
    assert path.shape == (7, 8, 8)
    np.testing.assert_allclose(path[0], rec[0], atol=2e-6)
    np.testing.assert_allclose(path[-1], rec[1], atol=2e-6)
    # Between codes: the ends are the decoded codes.
    codes = http.post("/vae2d/encode", json={"images": [a, b]}).json()["codes"]
    assert np.asarray(codes).shape == (2, 2)
    zpath = np.asarray(http.post("/vae2d/interpolate", json={"a": codes[0], "b": codes[1], "kind": "code",
                                                             "steps": 3}).json()["images"])
    np.testing.assert_allclose(zpath[0], rec[0], atol=2e-5)
    np.testing.assert_allclose(zpath[-1], rec[1], atol=2e-5)


@pytest.mark.ray
def test_http_grid_is_the_2d_manifold(http):
    r = http.post("/vae2d/grid", json={"steps": 5, "grid": True}).json()
    imgs, codes = np.asarray(r["images"]), np.asarray(r["codes"])
    assert imgs.shape == (25, 8, 8) and codes.shape == (25, 2)
    assert codes[0, 0] == pytest.approx(-1.644854, abs=1e-5) and codes[0, 1] == pytest.approx(1.644854, abs=1e-5)
    assert png_array(r["grid"]).shape == (5 * 9 - 1, 5 * 9 - 1)


@pytest.mark.ray
def test_http_search_finds_the_query_itself(http, digits):
    r = http.post("/dae/search", json={"images": digits[:5].tolist(), "k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["index"] == "digits" and out["rows"] == 300
    assert [hits[0]["id"] for hits in out["results"]] == [f"digits:test:{i}" for i in range(5)]
    assert all(len(h) == 3 and h[0]["score"] == pytest.approx(1.0, abs=1e-4) for h in out["results"])
    png = http.post("/dae/search", json={"images": [png_b64(digits[7])], "format": "png", "k": 1}).json()
    assert png["results"][0][0]["id"] == "digits:test:7"  # 8-bit PNG of the same digit: still its nearest


@pytest.mark.ray
def test_http_batches_concurrent_requests(http, serve_url, digits):
    before = http.get("/stats").json()
    body = {"images": [noisy(digits[:1]).tolist()[0]]}

    def one(_):
        with httpx.Client(base_url=serve_url, timeout=60) as c:
            return c.post("/dae/denoise", json=body).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    after = http.get("/stats").json()
    assert codes == [200] * 48
    assert after["requests"] - before["requests"] == 48
    assert after["batches"] - before["batches"] < 48  # some requests shared a model call
    assert after["max_batch"] >= 2


BIG = b'{"images": [' + b"[" * 10 + b"0" * (MAX_BODY_BYTES + 10) + b"]" * 10 + b"]}"


@pytest.mark.ray
@pytest.mark.parametrize("method, path, kw, status, words", [
    ("post", "/dae/denoise", {"json": {"images": [[[0.5] * 8] * 7]}}, 422, "shape [7, 8]"),
    ("post", "/dae/denoise", {"json": {"images": [png_b64(np.zeros((9, 9)))], "format": "png"}}, 422, "PNG is 9x9"),
    ("post", "/dae/denoise", {"content": b'{"images": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}'}, 422, "shape"),
    ("post", "/dae/denoise", {"content": json.dumps({"images": [[[0.5] * 8] * 8]}).replace("0.5", "NaN", 1)},
     422, "NaN"),
    ("post", "/dae/denoise", {"content": json.dumps({"images": [[[0.5] * 8] * 8]}).replace("0.5", "1e999", 1)},
     422, "infinite"),
    ("post", "/dae/denoise", {"json": {"images": [[[-0.1] * 8] * 8]}}, 422, "[0, 1]"),
    ("post", "/dae/denoise", {"json": {"images": ["iVBORw0KGgoAAAANSUhEUg=="], "format": "png"}}, 422,
     "undecodable PNG"),
    ("post", "/dae/denoise", {"json": {"images": ["%%%"], "format": "png"}}, 422, "base64"),
    ("post", "/dae/denoise", {"content": b'{"images": [[[0.5, 0.5'}, 400, "malformed JSON"),
    ("post", "/dae/denoise", {"content": b"[" * 50000}, 400, "JSON"),
    ("post", "/dae/denoise", {"json": {"images": [[[0.5] * 8] * 8] * (MAX_ITEMS + 1)}}, 422, "256"),
    ("post", "/dae/denoise", {"content": BIG}, 413, "8 MiB"),
    ("post", "/dae/generate", {"json": {"n": 2}}, 404, "no prior"),
    ("post", "/vae2d/denoise", {"json": {"images": [[[0.5] * 8] * 8]}}, 404, "not trained as a denoiser"),
    ("post", "/dae/grid", {"json": {}}, 404, "does not support /grid"),
    ("post", "/vae2d/search", {"json": {"images": [[[0.5] * 8] * 8]}}, 404, "--index"),
    ("post", "/dae/search", {"json": {"images": [[[0.5] * 8] * 8], "index": "nope"}}, 404, "unknown index"),
    ("post", "/dae/search", {"json": {"images": [[[0.5] * 8] * 8], "k": 0}}, 422, "k:"),
    ("post", "/nomodel/denoise", {"json": {"images": [[[0.5] * 8] * 8]}}, 404, "unknown model 'nomodel'"),
    ("post", "/dae/transmogrify", {"json": {}}, 404, "endpoint one of"),
    ("get", "/dae/denoise", {}, 405, "POST"),
    ("post", "/vae2d/generate", {"json": {"n": 0}}, 422, "n:"),
    ("post", "/vae2d/generate", {"json": {"n": 3, "z": [[0.1, 0.2, 0.3]]}}, 422, "2 numbers"),
    ("post", "/vae2d/interpolate", {"json": {"a": [0, 0], "b": [1, 1], "kind": "code", "steps": 65}}, 422, "steps"),
    ("post", "/vae2d/grid", {"json": {"steps": 17}}, 422, "steps"),
    ("post", "/dae/denoise", {"json": {"imagez": []}}, 422, "imagez"),
])
def test_http_bad_input_is_a_clear_4xx(http, method, path, kw, status, words):
    if "content" in kw:
        kw = {**kw, "headers": {"content-type": "application/json"}}
    r = getattr(http, method)(path, **kw)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert words in msg, msg


@pytest.mark.ray
def test_http_wrong_content_type_and_chunked_oversize(http):
    r = http.post("/dae/denoise", content=json.dumps({"images": [[[0.5] * 8] * 8]}),
                  headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must be enforced while the body streams in
        for _ in range(math.ceil((MAX_BODY_BYTES + 1) / 2**20)):
            yield b" " * 2**20

    r = http.post("/dae/denoise", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "8 MiB" in r.json()["error"]


@pytest.mark.ray
def test_http_still_healthy_after_bad_input(http, digits):
    """No bad request above crashed the replica: it still answers, with the same model."""
    assert http.get("/healthz").status_code == 200
    r = http.post("/dae/reconstruct", json={"images": digits[:2].tolist()})
    assert r.status_code == 200 and np.asarray(r.json()["images"]).shape == (2, 8, 8)


def test_bench_serve_ratio_needs_the_plain_side_of_the_same_run():
    """`raeflow bench serve` takes each ratio against the plain server's runs in the same report (first and last,
    averaged) and prints none where the plain side was not measured."""
    from raeflow.bench.serve import markdown, summarise

    def run(label, c, rps):
        return {"label": label, "concurrency": c, "rps": rps, "ok": 100, "p50_ms": 1.0, "p99_ms": 2.0, "failed": 0,
                "cpu_s": {"client": 0.1}, "server_stats": {}}

    report = {"concurrency": [1, 32], "modes": ["plain", "direct"], "images_per_request": 8, "models": {"m": {
        "runs": [run("plain", 32, 400.0), run("direct", 1, 50.0), run("direct", 32, 300.0), run("plain", 32, 200.0)]}}}
    rows = {(r["mode"], r["concurrency"]): r for r in summarise(report)}
    assert rows[("direct", 32)]["vs_plain"] == 1.0  # 300 against the mean of 400 and 200
    assert rows[("plain (last)", 32)]["rps"] == 200.0
    assert rows[("direct", 32)]["images_per_s"] == 2400.0
    assert rows[("direct", 1)]["vs_plain"] is None  # no plain run at one client in this report
    table = markdown({**report, "summary": summarise(report)})
    assert "no plain side" in table and "1.00x" in table


def test_model_calls_are_cut_into_cache_sized_chunks(dae, digits, monkeypatch):
    """A batch larger than MAX_CALL_ROWS runs in several calls and answers exactly what one call would."""
    import raeflow.serve.service as service

    x = np.concatenate([digits] * 5)[:, None].astype(np.float32)  # (320, 1, 8, 8)
    monkeypatch.setattr(service, "MAX_CALL_ROWS", 10_000)
    whole = dae.run("denoise", x)  # one call
    calls = []
    real = dae.model.denoise
    monkeypatch.setattr(dae.model, "denoise", lambda t: calls.append(len(t)) or real(t))
    monkeypatch.setattr(service, "MAX_CALL_ROWS", 128)
    np.testing.assert_allclose(dae.run("denoise", x), whole, atol=1e-6)
    assert calls == [128, 128, 64]
