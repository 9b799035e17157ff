"""Decoding one image, the rule every reader shares (in memory, streamed, embed, serve): bytes -> ``(C, H, W)``
float32 in [0, 1], converted to one colour mode and resized; with the limits that keep a hostile file from
exhausting memory. Plain Python (Pillow, NumPy); no Ray, no torch.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from raeflow.errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODES = {"L": 1, "RGB": 3}

Size = tuple[int, int]


#: Pixels one image may have (header checked before decoding): 40 megapixels, more than any camera photo. A
#: 10000x10000 PNG compresses to 250 KB and decodes to 100 MB (300 MB RGB; 1.2 GB as float32): refused.
MAX_IMAGE_PIXELS = 40_000_000
#: Bytes one image file may have: far above any single image.
MAX_IMAGE_FILE_BYTES = 256 << 20
#: When no size is given, images are resized to the first image's size -- but never above this many pixels
#: (aspect kept): a huge first file must not make every image that large.
MAX_DEFAULT_PIXELS = 256 * 256


def default_size(first: tuple[int, int]) -> Size:
    """``first`` (H, W), scaled down (aspect kept) to at most :data:`MAX_DEFAULT_PIXELS`."""
    h, w = int(first[0]), int(first[1])
    if h * w <= MAX_DEFAULT_PIXELS:
        return h, w
    f = math.sqrt(MAX_DEFAULT_PIXELS / (h * w))
    return max(1, int(h * f)), max(1, int(w * f))


def check_options(size: Size | None, mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"image mode must be one of {list(MODES)}, got {mode!r}")
    if size is not None and not (len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise InputError(f"size must be (height, width) in positive integers, got {size!r}")


def decode_image(data: bytes, size: Size | None = None, mode: str = "L", name: str = "<image bytes>") -> np.ndarray:
    """Encoded image bytes -> ``(C, H, W)`` float32 in [0, 1] (bytes / 255), C = 1 for ``"L"``, 3 for ``"RGB"``.

    Resized to ``size=(H, W)`` when given. ValueError naming ``name`` when the bytes are not a readable image.
    """
    check_options(size, mode)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: {img.size[0]}x{img.size[1]} pixels is over the limit of "
                             f"{MAX_IMAGE_PIXELS:,} pixels per image; downscale it")
        img.load()  # decode now, so a truncated file fails here rather than half-read
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"{name}: not a readable image ({e})") from None
    if img.mode.startswith("I;16"):
        # Pillow's conversion to "L" clips 16-bit values at 255 instead of scaling them: scale here.
        img = Image.fromarray(np.asarray(img, np.float32) / 257.0)  # mode "F", 0..255
    elif img.mode in ("I", "F"):
        raise InputError(f"{name}: {img.mode!r} images (32-bit pixels) have no fixed range; save it as 8- or 16-bit")
    else:
        img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    arr = np.asarray(img, np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape[0] != MODES[mode]:  # a 16-bit grey image asked for as RGB
        arr = np.repeat(arr, MODES[mode], axis=0)
    return np.clip(arr, 0.0, 1.0)  # bicubic resizing of "F" can overshoot
