"""The serving logic, with no Ray and no HTTP: one trained model behind the request rules.

:class:`ModelService` wraps one :class:`~raeflow.artifact.TrainedModel`. Which endpoints it offers comes from the
model's declared capabilities through the table in :mod:`raeflow.serve.endpoints`; the request models are in
:mod:`raeflow.serve.schemas`, the PNG codec in :mod:`raeflow.serve.codec`. The HTTP layer (``raeflow.serve.api``)
and the Ray Serve shell (``raeflow.serve.app``) only move bytes and batch calls; everything a request can get
wrong is decided here and raised as a :class:`ServiceError` (4xx + a message saying what is accepted), so a unit
test can exercise every rule without a server.

The split between *parse* (``inputs``), *compute* (``run`` on a whole batch, one model call for many requests)
and *render* (``render_images``) is what lets the replica batch requests: parsing and rendering are per request,
``run`` is what ``@serve.batch`` calls once for everything that arrived together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel

from raeflow.artifact import TrainedModel
from raeflow.models import capabilities as cap
from raeflow.serve.codec import decode_png, encode_png, finite_check, tile  # noqa: F401 - re-exported
from raeflow.serve.endpoints import BATCHED_OPS, ENDPOINTS, Plan, new_seed, plan  # noqa: F401 - re-exported
from raeflow.serve.errors import ServiceError, bad  # noqa: F401 - re-exported
from raeflow.serve.schemas import (DECIMALS, MAX_BODY_BYTES, MAX_ITEMS, ImagesRequest,  # noqa: F401 - re-exported
                                   validation_message)
from raeflow.errors import InputError

#: autoregressive samplers draw one position per forward pass (``model.sample_steps`` of them): a request may ask
#: for at most this many image-steps, so its latency stays bounded — a pixel-level PixelCNN on MNIST (784 steps)
#: gets n <= 5, a VQ-VAE's prior over 7x7 codes (49 steps) n <= 83
AUTOREGRESSIVE_STEP_BUDGET = 4096
#: rows per model call: a batch gathered from many requests (32 requests of 32 .npy images = 1,024 rows) is run in
#: calls of at most this many. Measured (conv DAE, one CPU thread): 1.59 ms per image at 1 row, 0.74 at 32-128,
#: 0.85 at 256 and 1.37 at 1,024 (the activations of a larger call fall out of cache).
MAX_CALL_ROWS = 128


@dataclass
class Inputs:
    """Decoded inputs of one request: ``x`` (B, *input_shape) float32; ``squeeze``: answer H x W arrays."""

    x: np.ndarray
    squeeze: bool


# ---------------------------------------------------------------------------------------------------- service
class ModelService:
    """One saved model behind the serving rules. Usable on its own: ``ModelService.load(run_dir)``."""

    def __init__(self, artifact: TrainedModel, name: str | None = None):
        self.artifact = artifact
        self.name = name or run_name(artifact.path)
        self.path = artifact.path
        self.model = artifact.model
        self.device = artifact.device
        self.data = artifact.data
        self.classes: list[str] | None = self.data.get("classes")
        self.vectoriser = artifact.vectoriser
        self.capabilities = artifact.capabilities
        self.input_shape = artifact.input.shape
        self.latent_dim = artifact.latent_dim
        self.is_image = artifact.input.is_image
        # Inputs in [0, 1] unless the decoder is linear (then any finite value is a valid input).
        self.bounded = artifact.input.bounded
        self.max_samples = MAX_ITEMS
        if cap.AUTOREGRESSIVE in self.capabilities:
            steps = max(1, int(self.model.sample_steps))  # promised by the capability
            self.max_samples = max(1, min(MAX_ITEMS, AUTOREGRESSIVE_STEP_BUDGET // steps))
        #: the embeddings indexes this model's codes can search (set by ``raeflow.serve.search.load_indexes``)
        self.indexes: list[Any] = []
        self.search_fn: Callable[[np.ndarray, int, str | None], dict[str, Any]] | None = None

    @classmethod
    def load(cls, path: "str | Path | TrainedModel", name: str | None = None, device: str = "cpu") -> "ModelService":
        return cls(TrainedModel.load(path, device), name)

    # ------------------------------------------------------------------------------------------ capabilities
    @property
    def endpoints(self) -> list[str]:
        """Every endpoint the model's declared capabilities allow (see ``raeflow.serve.endpoints``)."""
        return [n for n, e in ENDPOINTS.items() if e.refusal(self) is None]

    def require(self, endpoint: str) -> None:
        e = ENDPOINTS.get(endpoint)
        why = "no such endpoint" if e is None else e.refusal(self)
        if why is None:
            return
        raise ServiceError(404, f"model {self.name!r} ({self.artifact.variant}) does not support /{endpoint}: "
                                f"{why}; it supports {', '.join('/' + e for e in self.endpoints)}")

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "variant": self.artifact.variant, "input_shape": list(self.input_shape),
             "latent_dim": self.latent_dim, "kind": "image" if self.is_image else "vector",
             "capabilities": sorted(self.capabilities), "endpoints": self.endpoints,
             "formats": ["array", "png"] if self._png_ok() else ["array"],
             "documents": self.vectoriser is not None,
             "parameters": sum(p.numel() for p in self.model.parameters())}
        if self.data.get("name"):
            d["dataset"] = self.data["name"]
        return d

    def search(self, codes: np.ndarray, k: int, index: str | None) -> dict[str, Any]:
        self.require("search")
        assert self.search_fn is not None  # set together with self.indexes
        return self.search_fn(codes, k, index)

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
        if req.batch is not None:  # a binary (.npy) request: the batch was decoded from the body
            return self.batch_inputs(req.batch)
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
        if _has_bool(item):
            raise bad(f"{where}: true/false are not pixel values; send numbers in [0, 1]")
        try:
            a = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as e:
            # Ragged lists ("inhomogeneous shape"), strings or objects inside the lists.
            raise bad(f"{where}: not a rectangular array of numbers ({e}); model {self.name!r} accepts "
                      f"{self.accepted()}") from None
        return self._fit(a, where)

    def batch_inputs(self, a: np.ndarray) -> Inputs:
        """A whole batch sent as one array (a ``.npy`` body, already float32): (N, *input_shape), or (N, H, W)
        for a one-channel image model; the same shape, finiteness and range rules as one JSON item."""
        x, squeeze = self._fit(a, "the .npy batch", batched=True)
        return Inputs(x, squeeze)

    def _fit(self, a: np.ndarray, where: str, batched: bool = False) -> tuple[np.ndarray, bool]:
        """Check ``a`` against the input shape (after a leading batch axis when ``batched``), add a missing
        channel axis, check it is finite and, for bounded image models, in [0, 1]."""
        lead = a.shape[:1] if batched else ()
        shape, got = self.input_shape, a.shape[len(lead):]
        if got == shape:
            squeeze = False
        elif self.is_image and shape[0] == 1 and got == shape[1:]:
            a, squeeze = a.reshape(*lead, *shape), True
        else:
            raise bad(f"{where}: shape {list(a.shape)} does not fit model {self.name!r}, which accepts "
                      f"{self.accepted()}{' (with a leading batch axis)' if batched else ''}")
        finite_check(a, where)
        if self.bounded and self.is_image and (a.min() < 0 or a.max() > 1):
            raise bad(f"{where}: values must lie in [0, 1] (pixel intensity, e.g. bytes/255); got min "
                      f"{float(a.min()):.4g}, max {float(a.max()):.4g}")
        return a, squeeze

    def code(self, item: Any, where: str) -> np.ndarray:
        if _has_bool(item):
            raise bad(f"{where}: true/false are not code values; send {self.latent_dim} numbers")
        try:
            z = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as e:
            raise bad(f"{where}: not a list of numbers ({e}); a code is {self.latent_dim} finite numbers") from None
        if z.shape != (self.latent_dim,):
            raise bad(f"{where}: a code of shape {list(z.shape)}; model {self.name!r} has codes of "
                      f"{self.latent_dim} numbers")
        finite_check(z, where)
        if np.abs(z).max(initial=0.0) > MAX_CODE:
            # Codes live within a few units of 0; a decoder fed 1e30 overflows to NaN, which JSON cannot carry.
            raise bad(f"{where}: code values must lie within +-{MAX_CODE:g}; got {float(np.abs(z).max()):.4g}")
        return z

    def codes(self, rows: Sequence[Any]) -> np.ndarray:
        if not rows:
            raise bad(f"\"z\" is empty; send 1..{MAX_ITEMS} codes of {self.latent_dim} numbers, or leave it out "
                      "to sample n codes from the prior")
        return np.stack([self.code(r, f"z[{i}]") for i, r in enumerate(rows)])

    # ---------------------------------------------------------------------------------------------- compute
    @torch.no_grad()
    def run(self, op: str, x: np.ndarray) -> np.ndarray:
        """The model on a whole batch: ``op`` in BATCHED_OPS, ``x`` inputs (or codes for ``decode``), in calls of
        at most :data:`MAX_CALL_ROWS` rows."""
        if op not in BATCHED_OPS:
            raise InputError(f"unknown model call {op!r}; one of {BATCHED_OPS}")
        fn = getattr(self.model, op)  # each op is the model method of that name (its capability promises it)
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [fn(torch.from_numpy(x[a:a + MAX_CALL_ROWS]).to(self.device)).float().cpu().numpy()
                for a in range(0, len(x), MAX_CALL_ROWS)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

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
        elif cap.GENERATE in self.capabilities:
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


def handle_sync(svc: ModelService, endpoint: str, body: dict[str, Any] | BaseModel) -> dict[str, Any]:
    """Run one request start to finish in this thread (no batching): the plain path and the unit tests'."""
    step: dict[str, Any] | Plan = plan(svc, endpoint, body)
    while isinstance(step, Plan):
        step = step.finish(None if step.op is None else svc.run(step.op, step.x))
    return step



#: |code value| accepted by /generate and /interpolate (kind=code): priors are N(0, 1), trained codes a few units.
MAX_CODE = 1e4


def _has_bool(item: Any) -> bool:
    """Whether nested lists hold a JSON true/false anywhere (numpy would take them as 1.0 / 0.0)."""
    stack = [item]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, (list, tuple)):
            if v and not isinstance(v[0], (list, tuple)):  # a row of scalars: one C-speed scan
                if any(type(e) is bool for e in v):
                    return True
            else:
                stack.extend(v)
    return False


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
