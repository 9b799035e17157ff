"""The serving logic, with no Ray and no HTTP: request models, input decoding/validation, model calls, output
encoding.

:class:`ModelService` wraps one saved model. The HTTP layer (``raeflow.serve.api``) and the Ray Serve shell
(``raeflow.serve.app``) only move bytes and batch calls; everything a request can get wrong is decided here and
raised as a :class:`ServiceError` carrying the 4xx status and a message that says what was wrong and what is
accepted, so a unit test can exercise every rule without a server.

The split between *parse* (``inputs``), *compute* (``run`` on a whole batch, one model call for many requests)
and *render* (``render_images``) is what lets the replica batch requests: parsing and rendering are per request,
``run`` is what ``@serve.batch`` calls once for everything that arrived together.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from raeflow.io import load_model, read_config, read_vectoriser
from raeflow.models.base import Autoencoder

MAX_ITEMS = 256  # items (images, documents, codes, samples) per request
MAX_BODY_BYTES = 8 * 1024 * 1024  # request bodies above this get 413
MAX_STEPS = 64  # interpolation steps
MAX_GRID_SIDE = 16  # a grid of at most 16 x 16 = 256 decoded images
MAX_K = 100  # nearest neighbours per query
DECIMALS = 6  # arrays are answered rounded: shorter JSON, and float32 carries no more than ~7 digits anyway

#: Variants trained for robustness without an input corruption of their own, whose reconstruction is a denoiser.
ROBUST_VARIANTS = ("contractive",)

BATCHED_OPS = ("encode", "reconstruct", "denoise", "decode")


class ServiceError(Exception):
    """A client error: ``status`` (4xx) and a message naming what was wrong and what is accepted."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str, status: int = 422) -> ServiceError:
    return ServiceError(status, message)


# --------------------------------------------------------------------------------------------- request models
# ``extra="forbid"``: a misspelt field ("image", "setps") is answered with a 422 naming it instead of being ignored.
_FORMAT_DOC = ('"array": H x W (or C x H x W) nested lists of floats in [0, 1]; "png": base64-encoded PNG '
               'strings of the model\'s height and width. The answer uses the same format.')


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagesRequest(_Request):
    images: list[str | list[Any]] | None = Field(
        None, max_length=MAX_ITEMS, description=f"1..{MAX_ITEMS} inputs: arrays or base64 PNGs (see format).")
    documents: list[str] | None = Field(
        None, max_length=MAX_ITEMS, description="Raw texts, for document models saved with a vectoriser.")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = Field(False, description="Also answer one PNG tiling every output image, to look at.")


class SearchRequest(ImagesRequest):
    k: int = Field(10, ge=1, le=MAX_K, description="Nearest rows per query.")
    index: str | None = Field(None, description="Which --index to search; optional when only one is served.")


class GenerateRequest(_Request):
    n: int = Field(1, ge=1, le=MAX_ITEMS, description="Samples to draw from the prior (ignored when z is given).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same samples; omitted: random, "
                                                                   "and the one used is answered.")
    z: list[list[float]] | None = Field(None, max_length=MAX_ITEMS,
                                        description="Latent codes to decode instead of sampling.")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


class InterpolateRequest(_Request):
    a: str | list[Any] = Field(description="Start: an image (array or base64 PNG) or, with kind=code, a code.")
    b: str | list[Any] = Field(description="End, as a.")
    kind: Literal["image", "code"] = Field("image", description="Whether a and b are images or latent codes.")
    steps: int = Field(10, ge=2, le=MAX_STEPS)
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


class GridRequest(_Request):
    steps: int = Field(10, ge=2, le=MAX_GRID_SIDE, description="Points per latent axis (steps x steps images).")
    span: float | None = Field(None, gt=0, le=100, description="Decode codes in [-span, span]^2; omitted: the "
                                                               "prior's 5%..95% quantiles (generators) or [-1, 1].")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


# ------------------------------------------------------------------------------------------------- arrays / PNG
def _finite_check(x: np.ndarray, where: str) -> None:
    if not np.isfinite(x).all():
        bad_n = int((~np.isfinite(x)).sum())
        raise bad(f"{where}: {bad_n} value(s) are NaN, infinite or null; only finite numbers are accepted")


def decode_png(s: Any, shape: Sequence[int], where: str) -> np.ndarray:
    """A base64 PNG string -> (C, H, W) float32 in [0, 1], checked against the model's (C, H, W)."""
    from PIL import Image

    c, h, w = shape
    if not isinstance(s, str):
        raise bad(f"{where}: with format \"png\" each item must be a base64 string, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"{where}: not valid base64 ({e}); send the PNG file's bytes base64-encoded") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise bad(f"{where}: not a PNG (the decoded bytes lack the PNG signature); only PNG images are accepted")
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
        # Check the declared size before decoding any pixel: a tiny file can declare a huge image.
        if im.size != (w, h):
            raise bad(f"{where}: PNG is {im.size[0]}x{im.size[1]} (width x height); this model takes {w}x{h}")
        im = im.convert("L" if c == 1 else "RGB")  # decodes; palette/alpha/16-bit PNGs all end up 8-bit
        arr = np.asarray(im, dtype=np.float32) / 255.0
    except ServiceError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors... on corrupt data
        raise bad(f"{where}: undecodable PNG ({type(e).__name__}: {e})") from None
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def encode_png(img: np.ndarray) -> str:
    """(C, H, W) or (H, W) in [0, 1] -> base64 PNG (grey for one channel, RGB for three)."""
    from PIL import Image

    a = np.asarray(img)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    u8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def tile(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) -> one (C, rows*(H+pad)-pad, cols*(W+pad)-pad) image, row-major, padding white."""
    n, c, h, w = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.ones((c, rows * (h + pad) - pad, cols * (w + pad) - pad), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i]
    return out


@dataclass
class Inputs:
    """Decoded inputs of one request: ``x`` (B, *input_shape) float32; ``squeeze``: answer H x W arrays."""

    x: np.ndarray
    squeeze: bool


# ---------------------------------------------------------------------------------------------------- service
class ModelService:
    """One saved model behind the serving rules. Usable on its own: ``ModelService.load(run_dir)``."""

    def __init__(self, name: str, model: Autoencoder, data: dict[str, Any] | None = None,
                 vectoriser: Any = None, device: str = "cpu", path: str | Path | None = None):
        self.name = name
        self.path = path  # the model directory, when loaded from one (search matches indexes by its sha256)
        self.model = model.to(device).eval()
        self.device = device
        self.data = data or {}
        self.vectoriser = vectoriser
        self.input_shape = tuple(model.input_shape)
        self.latent_dim = int(model.latent_dim)
        self.is_image = len(self.input_shape) == 3
        # Inputs in [0, 1] unless the decoder is linear (then any finite value is a valid input).
        self.bounded = getattr(model, "loss_kind", "bce") != "mse_linear"
        self.endpoints = self._endpoints()

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, device: str = "cpu") -> "ModelService":
        cfg = read_config(path)
        vec = read_vectoriser(path)
        if vec is not None:
            from raeflow.data.text import Vectoriser

            vec = Vectoriser.from_json(vec)
        return cls(name or run_name(path), load_model(path, device), cfg.get("data"), vec, device, path)

    # ------------------------------------------------------------------------------------------ capabilities
    @property
    def is_generator(self) -> bool:
        return bool(getattr(self.model, "has_prior", False))

    @property
    def is_denoiser(self) -> bool:
        """Trained to undo noise: an input corruption, its own ``denoise``, or a robustness objective."""
        m = self.model
        overrides = type(m).denoise is not Autoencoder.denoise
        return getattr(m, "corruption", None) is not None or overrides or m.variant in ROBUST_VARIANTS

    def _endpoints(self) -> list[str]:
        eps = ["encode", "reconstruct"]
        if self.is_denoiser:
            eps.append("denoise")
        if self.is_generator:
            eps += ["generate", "interpolate"]
        if self.is_generator and self.latent_dim == 2:
            eps.append("grid")
        return eps

    def require(self, endpoint: str) -> None:
        if endpoint in self.endpoints:
            return
        why = {"denoise": "it was not trained as a denoiser (no corruption)",
               "generate": "it has no prior to sample from", "interpolate": "it has no prior (not a generator)",
               "grid": ("it has no prior (not a generator)" if not self.is_generator else
                        f"its latent space has {self.latent_dim} dimensions, not 2"),
               "search": "the server has no --index of embeddings made by this model"}.get(endpoint, "no such endpoint")
        raise ServiceError(404, f"model {self.name!r} ({self.model.variant}) does not support /{endpoint}: {why}; "
                                f"it supports {', '.join('/' + e for e in self.endpoints)}")

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "variant": self.model.variant, "input_shape": list(self.input_shape),
             "latent_dim": self.latent_dim, "kind": "image" if self.is_image else "vector",
             "generator": self.is_generator, "denoiser": self.is_denoiser, "endpoints": list(self.endpoints),
             "formats": ["array", "png"] if self._png_ok() else ["array"],
             "documents": self.vectoriser is not None,
             "parameters": sum(p.numel() for p in self.model.parameters())}
        if self.data.get("name"):
            d["dataset"] = self.data["name"]
        return d

    def _png_ok(self) -> bool:
        return self.is_image and self.input_shape[0] in (1, 3) and self.bounded

    # ------------------------------------------------------------------------------------------------- parse
    def accepted(self) -> str:
        if self.is_image:
            c, h, w = self.input_shape
            shapes = f"{h}x{w} or {c}x{h}x{w}" if c == 1 else f"{c}x{h}x{w}"
            rng = "in [0, 1]" if self.bounded else "finite"
            png = f", or base64 {w}x{h} PNGs with format \"png\"" if self._png_ok() else ""
            return f"arrays of shape {shapes} with values {rng}{png}"
        docs = " or raw texts as \"documents\"" if self.vectoriser is not None else ""
        return f"vectors of {self.input_shape[0]} finite values{docs}"

    def inputs(self, req: ImagesRequest) -> Inputs:
        """Decode and check a request's images / documents -> (B, *input_shape) float32."""
        if (req.images is None) == (req.documents is None):
            raise bad(f"send exactly one of \"images\" or \"documents\" (1..{MAX_ITEMS} items); "
                      f"model {self.name!r} accepts {self.accepted()}")
        if req.documents is not None:
            if self.vectoriser is None:
                raise bad(f"model {self.name!r} was saved without a vectoriser, so it cannot read raw documents; "
                          f"send \"images\": {self.accepted()}")
            if not req.documents:
                raise bad(f"\"documents\" is empty; send 1..{MAX_ITEMS}")
            x = self.vectoriser.transform(list(req.documents)).astype(np.float32)
            return Inputs(x.reshape(len(x), *self.input_shape), False)
        if not req.images:
            raise bad(f"\"images\" is empty; send 1..{MAX_ITEMS} items: {self.accepted()}")
        self.check_format(req.format)
        items = [self.one_input(item, req.format, f"images[{i}]") for i, item in enumerate(req.images)]
        squeeze = all(sq for _, sq in items)
        return Inputs(np.stack([a for a, _ in items]), squeeze)

    def check_format(self, fmt: str) -> None:
        if fmt == "png" and not self._png_ok():
            raise bad(f"model {self.name!r} takes {self.accepted()}; format \"png\" needs a 1- or 3-channel image "
                      "model with outputs in [0, 1]")

    def one_input(self, item: Any, fmt: str, where: str) -> tuple[np.ndarray, bool]:
        """One image -> ((*input_shape) float32, whether it was sent without its channel axis)."""
        if fmt == "png":
            return decode_png(item, self.input_shape, where), self.input_shape[0] == 1
        if isinstance(item, str):
            raise bad(f"{where}: got a string with format \"array\"; send nested lists of numbers, or set "
                      f"\"format\": \"png\" for base64 PNGs")
        try:
            a = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as e:
            # Ragged lists ("inhomogeneous shape"), strings or objects inside the lists.
            raise bad(f"{where}: not a rectangular array of numbers ({e}); model {self.name!r} accepts "
                      f"{self.accepted()}") from None
        shape = self.input_shape
        if a.shape == shape:
            squeeze = False
        elif self.is_image and shape[0] == 1 and a.shape == shape[1:]:
            a, squeeze = a[None], True
        else:
            raise bad(f"{where}: shape {list(a.shape)} does not fit model {self.name!r}, which accepts "
                      f"{self.accepted()}")
        _finite_check(a, where)
        if self.bounded and self.is_image and (a.min() < 0 or a.max() > 1):
            raise bad(f"{where}: values must lie in [0, 1] (pixel intensity, e.g. bytes/255); got min "
                      f"{float(a.min()):.4g}, max {float(a.max()):.4g}")
        return a, squeeze

    def code(self, item: Any, where: str) -> np.ndarray:
        try:
            z = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as e:
            raise bad(f"{where}: not a list of numbers ({e}); a code is {self.latent_dim} finite numbers") from None
        if z.shape != (self.latent_dim,):
            raise bad(f"{where}: a code of shape {list(z.shape)}; model {self.name!r} has codes of "
                      f"{self.latent_dim} numbers")
        _finite_check(z, where)
        return z

    def codes(self, rows: Sequence[Any]) -> np.ndarray:
        if not rows:
            raise bad(f"\"z\" is empty; send 1..{MAX_ITEMS} codes of {self.latent_dim} numbers, or leave it out "
                      "to sample n codes from the prior")
        return np.stack([self.code(r, f"z[{i}]") for i, r in enumerate(rows)])

    # ---------------------------------------------------------------------------------------------- compute
    @torch.no_grad()
    def run(self, op: str, x: np.ndarray) -> np.ndarray:
        """One model call on a whole batch: ``op`` in BATCHED_OPS, ``x`` inputs (or codes for ``decode``)."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        m = self.model
        out = {"encode": m.encode, "reconstruct": m.reconstruct, "denoise": m.denoise, "decode": m.decode}[op](t)
        return out.float().cpu().numpy()

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> np.ndarray:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self.model.sample(n, generator=g).float().cpu().numpy()

    def interpolation_codes(self, za: np.ndarray, zb: np.ndarray, steps: int) -> np.ndarray:
        """``steps`` codes on the segment za -> zb (both ends included)."""
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        return za[None] * (1 - t) + zb[None] * t

    def grid_codes(self, steps: int, span: float | None) -> np.ndarray:
        """(steps*steps, 2) codes, row-major with the second coordinate decreasing down the rows (as a plot)."""
        if span is not None:
            axis = np.linspace(-span, span, steps)
        elif self.is_generator:
            # Kingma & Welling's manifold figure: equal prior mass between neighbours (normal quantiles).
            from statistics import NormalDist

            axis = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, steps)])
        else:
            axis = np.linspace(-1.0, 1.0, steps)
        gx, gy = np.meshgrid(axis, axis[::-1])
        return np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)

    # ----------------------------------------------------------------------------------------------- render
    def render_images(self, y: np.ndarray, fmt: str, squeeze: bool, grid: bool, cols: int | None = None
                      ) -> dict[str, Any]:
        """(B, *input_shape) outputs -> ``{"images": [...], "grid"?: png}`` in the request's format."""
        out: dict[str, Any] = {}
        if fmt == "png":
            out["images"] = [encode_png(img) for img in y]
        else:
            a = y[:, 0] if (squeeze and self.is_image and self.input_shape[0] == 1) else y
            out["images"] = np.round(a.astype(np.float64), DECIMALS).tolist()
        if grid:
            if not self._png_ok():
                raise bad(f"\"grid\": true needs an image model with outputs in [0, 1]; model {self.name!r} "
                          f"answers {self.accepted()}")
            out["grid"] = encode_png(tile(np.clip(y, 0, 1), cols))
        return out

    def render_codes(self, z: np.ndarray) -> dict[str, Any]:
        return {"codes": np.round(z.astype(np.float64), DECIMALS).tolist()}

    # ------------------------------------------------------------------------------- whole requests, no batching
    # The plain path: parse, one model call, render. The Serve deployment does the same with ``run`` batched.
    def handle(self, endpoint: str, body: dict[str, Any] | BaseModel) -> dict[str, Any]:
        return handle_sync(self, endpoint, body)


def new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


REQUEST_MODELS: dict[str, type[_Request]] = {
    "encode": ImagesRequest, "reconstruct": ImagesRequest, "denoise": ImagesRequest, "search": SearchRequest,
    "generate": GenerateRequest, "interpolate": InterpolateRequest, "grid": GridRequest}


def parse_request(endpoint: str, body: dict[str, Any] | BaseModel) -> BaseModel:
    """Validate a JSON body (a dict) into the endpoint's request model; pydantic errors become one 422 message."""
    from pydantic import ValidationError

    cls = REQUEST_MODELS[endpoint]
    if isinstance(body, cls):
        return body
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise bad(f"invalid /{endpoint} request: {validation_message(e.errors())}") from None


def validation_message(errors: Sequence[dict[str, Any]], limit: int = 5) -> str:
    """pydantic's error list -> 'images.3: Input should be ...; n: ...' (the first few)."""
    parts = []
    for e in list(errors)[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclass
class Plan:
    """For one request: the batched call it needs (``op`` on ``x``) and ``finish``, which turns that call's output
    into the answer (a dict) or into the next Plan (interpolating images: encode both ends, then decode)."""

    op: str | None  # one of BATCHED_OPS, or None when the answer needs no batched call
    x: np.ndarray | None
    finish: Callable[[np.ndarray | None], "dict[str, Any] | Plan"]


def plan(svc: ModelService, endpoint: str, body: dict[str, Any] | BaseModel) -> Plan:
    """Parse and check one request; return the batched call it needs and how to render its result."""
    svc.require(endpoint)
    req = parse_request(endpoint, body)
    if endpoint in ("encode", "reconstruct", "denoise"):
        inp = svc.inputs(req)  # type: ignore[arg-type]
        if endpoint == "encode":
            if req.grid:  # type: ignore[union-attr]
                raise bad("\"grid\" applies to endpoints that answer images, not to /encode")
            return Plan("encode", inp.x, svc.render_codes)
        return Plan(endpoint, inp.x, lambda y: svc.render_images(y, req.format, inp.squeeze, req.grid))
    if endpoint == "generate":
        r: GenerateRequest = req  # type: ignore[assignment]
        svc.check_format(r.format)
        if r.z is not None:
            z = svc.codes(r.z)
            return Plan("decode", z, lambda y: svc.render_images(y, r.format, True, r.grid))
        seed = new_seed() if r.seed is None else r.seed
        # Sampling is per request (its own seeded generator); not batched, it costs one decode of n codes.
        y = svc.sample(r.n, seed)
        return Plan(None, None, lambda _: {**svc.render_images(y, r.format, True, r.grid), "seed": seed})
    if endpoint == "interpolate":
        r2: InterpolateRequest = req  # type: ignore[assignment]
        svc.check_format(r2.format)
        if r2.kind == "code":
            za, zb = svc.code(r2.a, "a"), svc.code(r2.b, "b")
            z = svc.interpolation_codes(za, zb, r2.steps)
            return Plan("decode", z, lambda y: svc.render_images(y, r2.format, True, r2.grid, cols=r2.steps))
        (a, sq_a), (b, sq_b) = svc.one_input(r2.a, r2.format, "a"), svc.one_input(r2.b, r2.format, "b")
        # Encode both ends (a batched call), then decode the segment between their codes (another).
        return Plan("encode", np.stack([a, b]), lambda zab: Plan(
            "decode", svc.interpolation_codes(zab[0], zab[1], r2.steps),
            lambda y: svc.render_images(y, r2.format, sq_a and sq_b, r2.grid, cols=r2.steps)))
    if endpoint == "grid":
        r3: GridRequest = req  # type: ignore[assignment]
        svc.check_format(r3.format)
        z = svc.grid_codes(r3.steps, r3.span)
        return Plan("decode", z, lambda y: {**svc.render_images(y, r3.format, True, r3.grid, cols=r3.steps),
                                            "codes": np.round(z.astype(np.float64), DECIMALS).tolist()})
    raise ServiceError(404, f"no endpoint /{endpoint}")


def handle_sync(svc: ModelService, endpoint: str, body: dict[str, Any] | BaseModel) -> dict[str, Any]:
    """Run one request start to finish in this thread (no batching): the plain path and the unit tests'."""
    step: dict[str, Any] | Plan = plan(svc, endpoint, body)
    while isinstance(step, Plan):
        step = step.finish(None if step.op is None else svc.run(step.op, step.x))
    return step


def run_name(path: str | Path) -> str:
    """A model's public name: its run directory's name (``runs/dae-mnist`` -> ``dae-mnist``)."""
    p = Path(path).resolve()
    if p.name == "model" and (p / "config.json").is_file():
        p = p.parent
    return p.name


class Stats:
    """Counters of the model calls a server made (``GET /stats``): how full batches get, what the model costs."""

    def __init__(self) -> None:
        self.requests = 0  # model calls asked for (one request may ask for two: interpolate)
        self.batches = 0  # calls made after batching
        self.items = 0  # images / codes through the model
        self.model_s = 0.0
        self.max_batch = 0

    def record(self, jobs: int, items: int, seconds: float) -> None:
        self.requests += jobs
        self.batches += 1
        self.items += items
        self.model_s += seconds
        self.max_batch = max(self.max_batch, jobs)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "items": self.items,
                "model_s": round(self.model_s, 4), "max_batch": self.max_batch,
                "mean_batch": round(self.requests / self.batches, 2) if self.batches else None}


def run_jobs(services: dict[str, ModelService], jobs: Sequence[tuple[str, str, np.ndarray]],
             stats: Stats | None = None) -> list[np.ndarray | BaseException]:
    """The batched step: jobs ``(model, op, x)`` from many requests -> one model call per (model, op).

    Returns one result per job, in order; a failing group answers its exception to its own jobs only, so one bad
    group cannot fail the other requests that happened to share the batch.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (name, op, _) in enumerate(jobs):
        groups.setdefault((name, op), []).append(i)
    results: list[Any] = [None] * len(jobs)
    for (name, op), idx in groups.items():
        xs = [jobs[i][2] for i in idx]
        t0 = time.perf_counter()
        try:
            y = services[name].run(op, np.concatenate(xs) if len(xs) > 1 else xs[0])
            if stats is not None:
                stats.record(len(idx), sum(len(x) for x in xs), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - handed back to the requests of this group
            for i in idx:
                results[i] = e
            continue
        start = 0
        for i, x in zip(idx, xs):
            results[i] = y[start:start + len(x)]
            start += len(x)
    return results
