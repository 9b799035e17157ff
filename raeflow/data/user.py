"""User data by path: a folder of images or ``.txt`` files, a ``.jsonl`` file, or Parquet file(s).

A model trains on one input shape, so decoded images are converted to one ``mode`` (``"L"``, the default, or
``"RGB"``) and resized — aspect ratio not kept — to ``size=(H, W)``, by default the size of the first image in
path order. Images given as float arrays (Parquet) are taken as they are and must all share one shape.

Labels: in a folder, when every file sits in a subfolder, its top-level subfolder's name is its class; otherwise
there are none. Files and Parquet rows may carry ``label`` and ``id`` fields; ids default to the relative path
(folders) or the row number. Hidden files and files of other types in a folder are ignored.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raeflow.data.core import RawSplit, check_budget, data_budget  # noqa: F401 - re-exported
from raeflow.data.text import check_document, read_text_file
from raeflow.errors import InputError, MissingFileError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SUPPORTED = (f"a folder of images ({' '.join(IMAGE_EXTS)}), a folder of .txt files, a .jsonl file with a \"text\" "
             "field, or a .parquet file (or a folder of them) with a \"text\" or \"image\" column")
MODES = {"L": 1, "RGB": 3}

Size = tuple[int, int]


#: Pixels one image may have (header checked before decoding): 40 megapixels, more than any camera photo. A
#: 10000x10000 PNG compresses to 250 KB and decodes to 100 MB (300 MB RGB; 1.2 GB as float32): refused.
MAX_IMAGE_PIXELS = 40_000_000
#: Bytes one image file may have: far above any single image.
MAX_IMAGE_FILE_BYTES = 256 << 20
#: A JSONL corpus is read whole (1 GiB is ~ a million long documents).
MAX_JSONL_BYTES = 1 << 30
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


def _check_options(size: Size | None, mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"image mode must be one of {list(MODES)}, got {mode!r}")
    if size is not None and not (len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise InputError(f"size must be (height, width) in positive integers, got {size!r}")


def decode_image(data: bytes, size: Size | None = None, mode: str = "L", name: str = "<image bytes>") -> np.ndarray:
    """Encoded image bytes -> ``(C, H, W)`` float32 in [0, 1] (bytes / 255), C = 1 for ``"L"``, 3 for ``"RGB"``.

    Resized to ``size=(H, W)`` when given. ValueError naming ``name`` when the bytes are not a readable image.
    """
    _check_options(size, mode)
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


def load_user_data(path: str | Path, *, size: Size | None = None, mode: str = "L") -> tuple[str, RawSplit]:
    """``("image" | "text", RawSplit)`` for user data; clear errors naming the file and the problem."""
    _check_options(size, mode)
    root = Path(path)
    if not root.exists():
        raise MissingFileError(f"{root}: no such file or folder")
    if root.is_dir():
        return _load_folder(root, size, mode)
    from raeflow.io import regular_file

    regular_file(root, MAX_JSONL_BYTES if root.suffix.lower() == ".jsonl" else 1 << 40, "a data file")
    suffix = root.suffix.lower()
    if suffix == ".jsonl":
        return "text", _load_jsonl(root)
    if suffix == ".parquet":
        return _load_parquet(root, [(root, "")], size, mode)
    raise InputError(f"{root}: unsupported file type {suffix or '(no extension)'}; supported: {SUPPORTED}")


def _load_folder(root: Path, size: Size | None, mode: str) -> tuple[str, RawSplit]:
    files = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.is_dir():
            continue
        if not p.is_file():  # a FIFO, a device, a broken link: reading it would hang or fail later, unnamed
            if p.suffix.lower() in (*IMAGE_EXTS, ".txt", ".parquet"):
                from raeflow.io import regular_file

                regular_file(p, 0, "a data file")  # raises, naming what it is
            continue
        files[rel.as_posix()] = p
    groups: dict[str, list[str]] = {"image": [], "text": [], "parquet": []}
    for rel in sorted(files):
        ext = Path(rel).suffix.lower()
        kind = "image" if ext in IMAGE_EXTS else {".txt": "text", ".parquet": "parquet"}.get(ext)
        if kind:
            groups[kind].append(rel)
    present = {k: v for k, v in groups.items() if v}
    if not present:
        found = Counter(Path(rel).suffix.lower() or "(no extension)" for rel in files)
        what = ", ".join(f"{n} {ext}" for ext, n in found.most_common()) or "it is empty"
        raise InputError(f"{root}: no usable files ({what}); supported: {SUPPORTED}")
    if len(present) > 1:
        mix = " and ".join(f"{len(v)} {k} files" for k, v in present.items())
        raise InputError(f"{root}: mixes {mix}; a dataset holds one kind, so put them in separate folders")
    kind, ids = present.popitem()
    if kind == "parquet":
        return _load_parquet(root, [(files[rel], f"{rel}#") for rel in ids], size, mode)
    y, classes = _folder_labels(ids)
    if kind == "text":
        return "text", RawSplit([read_text_file(files[rel]) for rel in ids], y, classes, ids)
    x = _decode_all([(files[rel], str(files[rel])) for rel in ids], size, mode)
    return "image", RawSplit(x, y, classes, ids)


def _folder_labels(ids: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    if not all("/" in i for i in ids):
        return None, None
    tops = [i.split("/", 1)[0] for i in ids]
    classes = sorted(set(tops))
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[t] for t in tops], np.int64), classes


def _decode_all(items: list[tuple[bytes | Path, str]], size: Size | None, mode: str) -> np.ndarray:
    """Decode ``(bytes or file, name)`` items into one array, sized like the first image unless ``size``."""
    def decode(src: bytes | Path, name: str, size: Size | None) -> np.ndarray:
        if isinstance(src, Path):
            from raeflow.io import regular_file

            src = regular_file(src, MAX_IMAGE_FILE_BYTES, "an image").read_bytes()
        return decode_image(src, size, mode, name)

    # The size is decided before anything is allocated: the one asked for, else the first image's, bounded.
    first = decode(*items[0], size)
    if size is None:
        size = default_size(first.shape[1:])
        if tuple(size) != tuple(first.shape[1:]):
            first = decode(*items[0], size)
    check_budget(len(items), first.size, f"{len(items):,} images of {first.shape}")
    x = np.empty((len(items), *first.shape), np.float32)  # filled in place: no second copy of the dataset
    x[0] = first
    for i, (src, name) in enumerate(items[1:], start=1):
        x[i] = decode(src, name, size)
    return x


def _labels(values: list[Any], names: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """Class indices into the sorted distinct labels (numeric order when all are integers)."""
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if len(missing) == len(values):
        return None, None
    if missing:
        raise InputError(f"{missing[0]}: no label, but other rows have one; label every row or none")
    for n, v in zip(names, values, strict=True):
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise InputError(f"{n}: a label must be a string or an integer, got {v!r}")
    numeric = all(isinstance(v, int) for v in values)
    classes = [str(v) for v in sorted(set(values))] if numeric else sorted(set(map(str, values)))
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[str(v)] for v in values], np.int64), classes


def _ids(values: list[Any], names: list[str], defaults: list[str]) -> list[str]:
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if len(missing) == len(values):
        return defaults
    if missing:
        raise InputError(f"{missing[0]}: no id, but other rows have one; give every row an id or none")
    ids = [str(v) for v in values]
    dup = next((i for i, n in Counter(ids).items() if n > 1), None)
    if dup is not None:
        raise InputError(f"{names[ids.index(dup)]}: id {dup!r} is not unique")
    return ids


def _jsonl_lines(f, path: Path):
    """``(line number, text)`` of a JSONL file opened in binary, decoded one line at a time."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from None
        offset += len(raw)


def _load_jsonl(path: Path) -> RawSplit:
    docs, labels, ids, names = [], [], [], []
    # Read a line at a time (never the whole file as one string besides the documents kept); binary lines split
    # on b"\n" only, not on U+2028 and the other characters str.splitlines breaks on (JSON strings may hold them).
    with open(path, "rb") as f:
        for lineno, line in _jsonl_lines(f, path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "text" not in rec:
                raise InputError(f"{where}: expected a JSON object with a \"text\" field")
            docs.append(check_document(rec["text"], where))
            labels.append(rec.get("label"))
            ids.append(rec.get("id"))
            names.append(where)
    if not docs:
        raise InputError(f"{path}: no documents (the file has no JSON lines)")
    y, classes = _labels(labels, names)
    return RawSplit(docs, y, classes, _ids(ids, names, [str(i) for i in range(len(docs))]))


def _load_parquet(root: Path, files: list[tuple[Path, str]], size: Size | None, mode: str) -> tuple[str, RawSplit]:
    """``files``: (path, id prefix) pairs; rows without an ``id`` column get ids ``prefix + row number``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = None
    values, labels, ids, names, defaults = [], [], [], [], []
    for path, prefix in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        cols = set(table.column_names)
        if ("text" in cols) == ("image" in cols):
            raise InputError(f"{path}: needs exactly one of the columns \"text\" (documents) or \"image\" "
                             f"(encoded images or float arrays); it has {sorted(cols)}")
        this = "text" if "text" in cols else "image"
        if kind not in (None, this):
            raise InputError(f"{path}: holds {this} rows but earlier files hold {kind}; a dataset holds one kind")
        kind = this
        n = table.num_rows
        rows = [f"{path} row {i}" for i in range(n)]
        values.extend(_text_column(table["text"], rows) if kind == "text"
                      else _image_column(table["image"], path, rows))
        labels.extend(table["label"].to_pylist() if "label" in cols else [None] * n)
        ids.extend(table["id"].to_pylist() if "id" in cols else [None] * n)
        names.extend(rows)
        defaults.extend(f"{prefix}{i}" for i in range(n))
    if not values:
        raise InputError(f"{root}: no rows")
    y, classes = _labels(labels, names)
    row_ids = _ids(ids, names, defaults)
    if kind == "text":
        return "text", RawSplit(values, y, classes, row_ids)
    encoded = [isinstance(v, bytes) for v in values]
    if any(encoded) and not all(encoded):
        raise InputError(f"{names[encoded.index(not encoded[0])]}: mixes encoded images and float arrays with "
                         f"{names[0]}; a dataset holds one kind")
    if encoded[0]:
        return "image", RawSplit(_decode_all(list(zip(values, names, strict=True)), size, mode), y, classes, row_ids)
    return "image", RawSplit(_stack_arrays(values, names, size), y, classes, row_ids)


def _text_column(col: Any, names: list[str]) -> list[str]:
    return [check_document(v, n) for v, n in zip(col.to_pylist(), names, strict=True)]


def _image_column(col: Any, path: Path, names: list[str]) -> list[Any]:
    """Per row: encoded bytes, or a float array for list / tensor columns."""
    import pyarrow as pa

    t = col.type
    if isinstance(t, pa.FixedShapeTensorType):  # Arrow's canonical tensor type, e.g. from Ray Data
        return list(col.combine_chunks().to_numpy_ndarray())
    if isinstance(t, pa.ExtensionType):  # e.g. Ray's own tensor type: read its storage
        col, t = pa.chunked_array([c.storage for c in col.chunks], t.storage_type), t.storage_type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face's {bytes, path} image column
        col, t = col.combine_chunks().field("bytes"), t.field("bytes").type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        out = col.to_pylist()
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        out = list(col.to_numpy(zero_copy_only=False))  # one (nested object) array per row
    else:
        raise InputError(f"{path}: the image column must hold encoded image bytes "
                         f"(PNG/JPEG…) or lists of floats, found {t}")
    for v, n in zip(out, names, strict=True):
        if v is None:
            raise InputError(f"{n}: no image (null)")
    return out


def _float_image(value: Any, size: Size | None, name: str) -> np.ndarray:
    """One row's floats as ``(C, H, W)``: nested (H, W) / (C, H, W), or flat (square, or shaped by ``size``)."""
    def dense(v):
        return np.stack([dense(u) for u in v]) if isinstance(v, np.ndarray) and v.dtype == object else v

    try:
        raw = np.asarray(dense(value))
        a = raw.astype(np.float32)
    except (ValueError, TypeError) as e:
        raise InputError(f"{name}: not a rectangular array of numbers ({e})") from None
    if np.issubdtype(raw.dtype, np.integer):  # bytes, as the streamed read takes them (raeflow.data.readers)
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise InputError(f"{name}: integer pixels must be bytes in 0..255; found min {raw.min()}, max {raw.max()}")
        a /= np.float32(255.0)
    if a.ndim == 1:
        h, w = size or (math.isqrt(a.size),) * 2
        if h * w == 0 or a.size % (h * w) or a.size // (h * w) not in (1, 3):
            hint = f"size={size}" if size else "not square; pass size=(H, W)"
            raise InputError(f"{name}: wrong shape: {a.size} values do not make a 1- or 3-channel image ({hint})")
        a = a.reshape(-1, h, w)
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise InputError(f"{name}: wrong shape {a.shape}: expected (H, W), (C, H, W) with C 1 or 3, or a flat list")
    if size and a.shape[1:] != tuple(size):
        raise InputError(f"{name}: wrong shape {a.shape}: size={size} was asked for and float images are not resized")
    if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
        raise InputError(f"{name}: pixel values must be finite and in [0, 1] (e.g. bytes / 255); found "
                         f"min {np.nanmin(a):g}, max {np.nanmax(a):g}")
    return a


def _stack_arrays(values: list[Any], names: list[str], size: Size | None) -> np.ndarray:
    first = _float_image(values[0], size, names[0])
    check_budget(len(values), first.size, f"{len(values):,} images of {first.shape}")
    x = np.empty((len(values), *first.shape), np.float32)
    for i, (v, n) in enumerate(zip(values, names, strict=True)):
        a = first if i == 0 else _float_image(v, size, n)
        if a.shape != first.shape:
            raise InputError(f"{n}: wrong shape {a.shape}: the first row is {first.shape} and float images are not "
                             "resized; give every row one shape")
        x[i] = a
    return x
