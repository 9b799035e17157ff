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


# ------------------------------------------------------------------------------------------------ .npy batches
#: The binary request and answer format: one ``.npy`` file (numpy's own format: a short text header, then the raw
#: array) holding a batch of images. Not an IANA type; ``application/x-npy`` is the name numpy users pass around.
NPY = "application/x-npy"
#: dtypes a batch may come in: bytes (0..255, scaled by 1/255 as training reads pixels) or floats in [0, 1]
NPY_DTYPES = ("uint8", "float16", "float32", "float64")


def decode_npy(body: bytes, max_items: int) -> np.ndarray:
    """A ``.npy`` body -> (N, ...) float32 (uint8 pixels scaled to [0, 1]). The header is read and checked before
    any pixel: never pickles (object arrays are refused), never trusts a shape the bytes do not hold."""
    from numpy.lib import format as npy

    f = io.BytesIO(body)
    try:
        version = npy.read_magic(f)
        read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}; np.save writes 1.0")
        shape, fortran, dtype = read_header(f)
    except ServiceError:
        raise
    except Exception as e:  # bad magic, truncated or unparseable header
        raise bad(f"not a .npy body ({e}); send np.save's bytes of an (N, H, W) or (N, C, H, W) array with "
                  f"Content-Type: {NPY}") from None
    if dtype.hasobject or dtype.name not in NPY_DTYPES:
        raise bad(f".npy dtype {dtype} is not accepted; send one of {', '.join(NPY_DTYPES)} (uint8: bytes 0..255)")
    if len(shape) < 2 or not 1 <= shape[0] <= max_items:
        raise bad(f".npy shape {list(shape)}: send a batch of 1..{max_items} items along the first axis")
    need = int(np.prod(shape)) * dtype.itemsize
    data = body[f.tell():]
    if len(data) != need:
        raise bad(f".npy header says {list(shape)} {dtype} ({need:,} bytes) but the body holds {len(data):,}")
    a = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return (a.astype(np.float32) / 255.0) if dtype == np.uint8 else a.astype(np.float32)


def encode_npy(a: np.ndarray) -> bytes:
    """An answer array as ``.npy`` bytes, float32 (exact: no rounding, unlike the JSON answers)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
