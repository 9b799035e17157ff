"""The HTTP API as a plain FastAPI app (no Ray): routes, body limit, and errors turned into clear 4xx answers.

:func:`build_app` takes a *backend*: the object that owns the :class:`ModelService` instances and runs the
model calls. The Ray Serve replica (``raeflow.serve.app``) is a backend whose ``run`` goes through
``@serve.batch``; :class:`DirectBackend` calls the model once per request, which is what the benchmark's plain
FastAPI + uvicorn server uses and what lets this module be tested without Ray.
"""
from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable, Protocol
from urllib.parse import parse_qsl

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raeflow.version import __version__
from raeflow.serve.codec import NPY, decode_npy, encode_npy
from raeflow.serve.endpoints import ENDPOINTS, Endpoint, Plan, parse_request, plan
from raeflow.serve.errors import ServiceError, bad
from raeflow.serve.schemas import MAX_BODY_BYTES, MAX_ITEMS, validation_message
from raeflow.serve.service import ModelService, Stats, run_jobs

MODEL_ENDPOINTS = tuple(ENDPOINTS)


class Backend(Protocol):
    services: dict[str, ModelService]
    stats: Stats

    async def run(self, model: str, op: str, x: np.ndarray) -> np.ndarray: ...


class DirectBackend:
    """Runs every model call in the request's own thread, one call per request (no batching)."""

    def __init__(self, services: dict[str, ModelService]):
        self.services = services
        self.stats = Stats()

    async def run(self, model: str, op: str, x: np.ndarray) -> np.ndarray:
        out = run_jobs(self.services, [(model, op, x)], self.stats)[0]
        if isinstance(out, BaseException):
            raise out
        return out


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


#: Seconds a request may wait for each piece of its body (not for the whole request: a large body on a slow
#: link keeps arriving). A client that sends headers and then stalls gets 408 instead of holding a replica slot.
BODY_READ_TIMEOUT_S = 30.0


class BodyLimit:
    """Pure ASGI: 413 for bodies over ``limit`` bytes, before any route reads them; 408 for a body that stalls.

    A declared Content-Length over the limit is refused at once (nothing is read); a chunked body is counted as
    it streams in and refused as soon as it passes the limit. (Starlette's own limiter only acts once a route
    reads the body, and answers plain text.)
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, read_timeout_s: float = BODY_READ_TIMEOUT_S):
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s

    def _too_large(self, size: str) -> JSONResponse:
        return error(413, too_large_message(size, self.limit))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await error(400, f"invalid Content-Length header {v[:40]!r}")(scope, receive, send)
                    return
        if declared is not None and declared > self.limit:
            await self._too_large(f"of {declared:,} bytes")(scope, receive, send)
            return
        seen = 0
        started = False

        body_done = False

        async def counting_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: wait for it as long as the app likes
                return await receive()
            try:
                # A client that opens a request and trickles its body (or stops) must not hold a slot forever.
                msg = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise _SlowBody(self.read_timeout_s) from None
            body_done = msg["type"] != "http.request" or not msg.get("more_body", False)
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large(f"of more than {self.limit:,} bytes")(scope, receive, send)
        except _SlowBody as e:
            if not started:
                await error(408, e.detail)(scope, receive, send)


def too_large_message(size: str, limit: int) -> str:
    return (f"request body {size} exceeds the limit of {limit:,} bytes ({limit / 2**20:g} MiB); send at most "
            f"{MAX_ITEMS} items per request, or PNGs instead of arrays")


class _SlowBody(StarletteHTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body stalled: no data for {timeout_s:g} s; send the whole body promptly")


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body reader re-raises it (instead of making it "error parsing the body") and
    # the app's HTTP error handler answers it, with this message, when the route was already reading.
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(f"of more than {limit:,} bytes", limit))


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return ""


def media_types(header: str) -> list[str]:
    """``'application/x-npy; q=1, */*'`` -> ``['application/x-npy', '*/*']`` (parameters and q-values dropped)."""
    return [t.split(";", 1)[0].strip().lower() for t in header.split(",") if t.strip()]


def wants_npy(accept: str, endpoint: Endpoint) -> bool:
    """Content negotiation for a binary request: ``.npy`` when the client accepts it and the endpoint answers one
    array; JSON when the client asks for JSON or the answer is structured (labels, neighbours). No Accept header
    (or ``*/*``): the same format out as in, where the endpoint can."""
    types = media_types(accept) or ["*/*"]
    if NPY in types:
        if endpoint.array_answer:
            return True
        if "application/json" not in types and "*/*" not in types:
            raise ServiceError(406, f"/{endpoint.name} answers JSON (not one array); send Accept: application/json")
        return False
    return endpoint.array_answer and "application/json" not in types


class BinaryRequests:
    """Pure ASGI: ``POST /{model}/{endpoint}`` with ``Content-Type: application/x-npy`` -- a batch of inputs as one
    ``.npy`` body, request options in the query string -- is answered by ``handle`` without FastAPI's JSON body
    parsing; every other request goes on to the app. The JSON routes document it (their OpenAPI request body
    lists both content types)."""

    def __init__(self, app: ASGIApp, handle: Callable[[str, str, bytes, str, str], Awaitable[Response]]):
        self.app, self.handle = app, handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and \
                media_types(_header(scope, b"content-type"))[:1] == [NPY]:
            path = scope["path"]
            root = scope.get("root_path", "")
            path = path[len(root):] if root and path.startswith(root) else path
            parts = path.strip("/").split("/")
            if len(parts) == 2 and all(parts):
                try:
                    body = await Request(scope, receive).body()  # BodyLimit (outside) stops an oversized body
                except ClientDisconnect:
                    return
                try:
                    resp = await self.handle(parts[0], parts[1], body, scope.get("query_string", b"")
                                             .decode("latin-1"), _header(scope, b"accept"))
                except ServiceError as e:
                    resp = error(e.status, e.message)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


#: said (500) instead of an answer holding NaN or infinity, JSON or .npy alike
NON_FINITE_ANSWER = "the model produced a non-finite number (NaN or infinity); no answer is sent"


def _json(out: dict[str, Any]) -> Response:
    # Serialise here with orjson (compact, no jsonable_encoder walk over every float): the answers are large nested
    # lists. orjson writes NaN/inf as null; a non-finite number is a broken answer, so it becomes an error instead.
    body = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in body and _non_finite(out):  # the walk only when a null is there (None is a legitimate value)
        return error(500, NON_FINITE_ANSWER)
    return Response(body, media_type="application/json")


def _non_finite(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_non_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_non_finite(x) for x in v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "fc":
        return not bool(np.isfinite(v).all())
    return False


ROUTES_HELP = ("GET /healthz, GET /models, GET /docs, and POST /{model}/{endpoint} with endpoint one of "
               + ", ".join(MODEL_ENDPOINTS))


_BINARY = {"type": "string", "format": "binary"}


def binary_docs(endpoint: Endpoint) -> dict[str, Any]:
    """The OpenAPI entries for an endpoint's ``.npy`` request and answer (BinaryRequests answers them)."""
    if not endpoint.takes_batches:
        return {}
    fields = [f for f in endpoint.request.model_fields if f not in ("images", "documents", "format")]
    docs: dict[str, Any] = {"openapi_extra": {"requestBody": {"content": {NPY: {"schema": {
        **_BINARY, "description": f"np.save bytes of a batch of 1..{MAX_ITEMS} images: (N, H, W) or (N, C, H, W), "
                                  "uint8 (0..255) or float in [0, 1]. Options as query parameters: "
                                  + ", ".join(fields) + "."}}}}}}
    if endpoint.array_answer:
        docs["responses"] = {200: {"description": "JSON, or with Accept: application/x-npy (the default for a "
                                                  ".npy request) the answer array as float32 .npy bytes",
                                   "content": {NPY: {"schema": _BINARY}}}}
    return docs


def build_app(backend: Backend) -> FastAPI:
    """The FastAPI app over ``backend``; OpenAPI schema at /openapi.json, docs at /docs."""
    app = FastAPI(title="raeflow", version=__version__,
                  description="Autoencoders over HTTP: encode, reconstruct, denoise, generate, interpolate, grid, "
                              "search. JSON in and out; images as arrays in [0, 1] or base64 PNGs. "
                              f"At most {MAX_ITEMS} items per request and {MAX_BODY_BYTES // 2**20} MiB per body.")
    # Middleware added last runs first: BodyLimit sees every body, binary ones included, before anything reads it.
    app.add_middleware(BinaryRequests, handle=lambda *a: answer_binary(*a))
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError):
        return error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        errs = e.errors()
        bad_json = [x for x in errs if x.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx") or {}
            pos = bad_json[0].get("loc", ("", "?"))[-1]
            return error(400, f"malformed JSON ({ctx.get('error', 'decode error')} at byte {pos}); send a JSON "
                              "object such as {\"images\": [[[0.0, ...], ...]], \"format\": \"array\"}")
        if len(errs) == 1 and tuple(errs[0].get("loc", ())) == ("body",) and isinstance(errs[0].get("input"), bytes):
            # FastAPI hands the raw bytes on when the Content-Type is not JSON.
            return error(415, "the body was not read as JSON: send it with Content-Type: application/json")
        return error(422, f"invalid request: {validation_message(errs)}; see /docs for the request schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; routes: {ROUTES_HELP}")
        if e.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}; model endpoints take POST "
                              "with a JSON body, /healthz and /models take GET")
        if e.status_code == 400 and e.detail == "There was an error parsing the body":
            return error(400, "could not parse the body as JSON (too deeply nested, or not UTF-8); send a JSON "
                              "object, see /docs")
        return error(e.status_code, str(e.detail))

    def service(model: str) -> ModelService:
        svc = backend.services.get(model)
        if svc is None:
            raise ServiceError(404, f"unknown model {model!r}; served models: {', '.join(sorted(backend.services))}"
                                    " (GET /models lists them with their endpoints)")
        return svc

    async def answer(model: str, endpoint: str, body: Any) -> Response:
        svc = service(model)
        step: dict[str, Any] | Plan = plan(svc, endpoint, body)
        while isinstance(step, Plan):
            y = None if step.op is None else await backend.run(model, step.op, step.x)
            step = step.finish(y)
        return _json(step)

    async def answer_binary(model: str, name: str, body: bytes, query: str, accept: str) -> Response:
        """A ``.npy`` batch for an endpoint that takes images; answered as ``.npy`` (one array: codes or images)
        or JSON, by :func:`wants_npy`. The batch replaces the JSON body's ``images``; options are query
        parameters (``?k=5&index=docs`` for /search); every rule after decoding is the JSON request's."""
        endpoint = ENDPOINTS.get(name)
        if endpoint is None:
            raise ServiceError(404, f"no route POST /{model}/{name}; routes: {ROUTES_HELP}")
        if not endpoint.takes_batches:
            raise ServiceError(415, f"/{name} takes a JSON body only; .npy batches go to "
                                    + ", ".join(f"/{e.name}" for e in ENDPOINTS.values() if e.takes_batches))
        svc = service(model)
        svc.require(name)
        opts = dict(parse_qsl(query, keep_blank_values=True))
        sent = sorted(set(opts) & {"images", "documents", "format"})
        if sent:
            raise bad(f"query parameter(s) {', '.join(sent)}: a .npy request's images are its body")
        npy_out = wants_npy(accept, endpoint)
        req = parse_request(endpoint, opts).with_batch(decode_npy(body, MAX_ITEMS))
        if not npy_out:
            return await answer(model, name, req)
        if req.grid:
            raise bad("\"grid\" is a PNG inside a JSON answer; ask for JSON (Accept: application/json) to get it")
        step = plan(svc, name, req)
        y = await backend.run(model, step.op, step.x)  # array_answer: the one batched call's output is the answer
        if not np.isfinite(y).all():
            raise ServiceError(500, NON_FINITE_ANSWER)
        return Response(encode_npy(y), media_type=NPY)

    # HEAD wherever GET exists (load balancers and `curl -I` probe with HEAD); Starlette drops the body.
    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness: the models are loaded")
    async def healthz():
        return {"status": "ok", "models": sorted(backend.services)}

    @app.get("/replica", summary="Which replica answered, and on which Ray node (placement across a cluster)")
    async def replica():
        return getattr(backend, "placement", {"replica": None, "node": None})

    @app.api_route("/models", methods=["GET", "HEAD"], summary="The served models, their shapes and the endpoints each supports")
    async def models():
        return {"models": [backend.services[n].describe() for n in sorted(backend.services)],
                "limits": {"max_items": MAX_ITEMS, "max_body_bytes": MAX_BODY_BYTES}}

    @app.api_route("/stats", methods=["GET", "HEAD"], summary="This replica's model-call counters: requests, batches, items, model seconds")
    async def stats():
        return backend.stats.as_dict()

    def add_route(endpoint: Endpoint) -> None:
        # One route per declared endpoint; the body's type annotation is what FastAPI validates and documents.
        async def route(model, body):
            return await answer(model, endpoint.name, body)

        route.__name__ = endpoint.name
        route.__annotations__ = {"model": str, "body": endpoint.request}  # real types, not postponed strings
        app.post(f"/{{model}}/{endpoint.name}", summary=endpoint.summary, **binary_docs(endpoint))(route)

    for endpoint in ENDPOINTS.values():
        add_route(endpoint)

    return app
