"""The request bodies of every endpoint (pydantic models: validation and the OpenAPI schema) and the limits.

``extra="forbid"``: a misspelt field ("image", "setps") is answered with a 422 naming it instead of being ignored.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

MAX_ITEMS = 256  # items (images, documents, codes, samples) per request
MAX_BODY_BYTES = 8 * 1024 * 1024  # request bodies above this get 413
MAX_STEPS = 64  # interpolation steps
MAX_GRID_SIDE = 16  # a grid of at most 16 x 16 = 256 decoded images
MAX_K = 100  # nearest neighbours per query
DECIMALS = 6  # arrays are answered rounded: shorter JSON, and float32 carries no more than ~7 digits anyway


_FORMAT_DOC = ('"array": H x W (or C x H x W) nested lists of floats in [0, 1]; "png": base64-encoded PNG '
               'strings of the model\'s height and width. The answer uses the same format.')


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagesRequest(Request):
    images: list[str | list[Any]] | None = Field(
        None, max_length=MAX_ITEMS, description=f"1..{MAX_ITEMS} inputs: arrays or base64 PNGs (see format).")
    documents: list[str] | None = Field(
        None, max_length=MAX_ITEMS, description="Raw texts, for document models saved with a vectoriser.")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = Field(False, description="Also answer one PNG tiling every output image, to look at.")
    # A binary request's batch, decoded from its .npy body (api.py): never a JSON field, so not in the schema.
    _batch: Any = PrivateAttr(None)

    @property
    def batch(self) -> Any:
        """(N, ...) float32 from a ``.npy`` body, or None for a JSON request."""
        return self._batch

    def with_batch(self, batch: Any) -> "ImagesRequest":
        self._batch = batch
        return self


class SearchRequest(ImagesRequest):
    k: int = Field(10, ge=1, le=MAX_K, description="Nearest rows per query.")
    index: str | None = Field(None, description="Which --index to search; optional when only one is served.")


class GenerateRequest(Request):
    n: int = Field(1, ge=1, le=MAX_ITEMS, description="Samples to draw from the prior (ignored when z is given).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same samples; omitted: random, "
                                                                   "and the one used is answered.")
    z: list[list[float]] | None = Field(None, max_length=MAX_ITEMS,
                                        description="Latent codes to decode instead of sampling.")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


class InterpolateRequest(Request):
    a: str | list[Any] = Field(description="Start: an image (array or base64 PNG) or, with kind=code, a code.")
    b: str | list[Any] = Field(description="End, as a.")
    kind: Literal["image", "code"] = Field("image", description="Whether a and b are images or latent codes.")
    steps: int = Field(10, ge=2, le=MAX_STEPS)
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


class GridRequest(Request):
    steps: int = Field(10, ge=2, le=MAX_GRID_SIDE, description="Points per latent axis (steps x steps images).")
    span: float | None = Field(None, gt=0, le=100, description="Decode codes in [-span, span]^2; omitted: the "
                                                               "prior's 5%..95% quantiles (generators) or [-1, 1].")
    format: Literal["array", "png"] = Field("array", description=_FORMAT_DOC)
    grid: bool = False


def validation_message(errors: Sequence[dict[str, Any]], limit: int = 5) -> str:
    """pydantic's error list -> 'images.3: Input should be ...; n: ...' (the first few)."""
    parts = []
    for e in list(errors)[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
