"""Images on the wire: base64 PNG in and out, finite-number checks, and tiling outputs into one picture.

Plain numpy + Pillow; every failure is a :class:`~raeflow.serve.errors.ServiceError` naming the item and what
is accepted.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, Sequence

import numpy as np

from raeflow.serve.errors import ServiceError, bad


def finite_check(x: np.ndarray, where: str) -> None:
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
