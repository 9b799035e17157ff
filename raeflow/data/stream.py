"""A training corpus read by Ray Data tasks, never by the driver: the streamed read of the one input layer.

``raeflow train`` reads a small corpus into memory (:func:`raeflow.data.load_training_data`, the fast path) and
streams a large one: the same sources ``raeflow embed`` reads (:mod:`raeflow.data.sources`: folders, Parquet,
JSONL, with the same per-row rules and error messages), decoded in Ray Data tasks, split into train and
validation by the same hash of each row's id the in-memory path uses (:func:`raeflow.data.core.in_validation`),
and fed to each Ray Train worker as its shard (``get_dataset_shard`` + ``iter_torch_batches``). The driver lists
files and counts rows; it never holds pixels or documents.

:class:`TrainRows` (the per-block step: error rows, split, pixels as float32, documents vectorised) is a plain
callable that the tests call without Ray.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raeflow.data.core import ArrayDataset, data_budget, in_validation, validation_fraction
from raeflow.data.readers import (MAX_IMAGE_FILE_BYTES, SUPPORTED, Prep, classify_folder,
                                  is_list, read_input_file)
from raeflow.data.rows import ERROR, ID, TEXT, X
from raeflow.errors import InputError, MissingFileError

#: ``data.read``: how ``raeflow train`` reads its corpus.
READ_MODES = ("auto", "memory", "stream")
#: ``auto`` streams a user corpus whose decoded float32 rows would take more than this share of the data budget
#: (a quarter of RAM by default): below it, reading once into memory is faster and simpler.
STREAM_ABOVE = 0.5


def probe(spec: str, mode: str = "L", size: tuple[int, int] | None = None) -> tuple[str, tuple[int, ...] | None]:
    """``(kind, input shape)`` of a user corpus from its listing and first row only (documents: shape None,
    decided by the vocabulary): the one resolver of what a path holds, for the in-memory and the streamed read.
    Encoded images take ``mode``'s channels and ``size`` (H, W), by default the first image's size, bounded
    (:func:`raeflow.data.decode.default_size`); pixel arrays keep their own channels, flat ones must be square
    unless ``size`` shapes them."""
    root = Path(spec)
    if not root.exists():
        raise MissingFileError(f"{root}: no such file or folder")
    if root.is_dir():
        kind, rels = classify_folder(root)
        if kind == "text":
            return "text", None
        if kind == "image":
            return "image", _encoded_shape(read_input_file(root, rels[0], MAX_IMAGE_FILE_BYTES), rels[0], mode, size)
        return _probe_parquet(root / rels[0], mode, size)
    read_input_file(root.parent, root.name, 1 << 62, read=False)  # a FIFO or a device would hang the first read
    suffix = root.suffix.lower()
    if suffix == ".jsonl":
        return "text", None
    if suffix == ".parquet":
        return _probe_parquet(root, mode, size)
    raise InputError(f"{root}: unsupported file type {suffix or '(no extension)'}; supported: {SUPPORTED}")


def _encoded_shape(data: bytes, name: str, mode: str, size: tuple[int, int] | None) -> tuple[int, ...]:
    from raeflow.data.decode import MODES, decode_image, default_size

    if size is None:
        size = default_size(decode_image(data, None, "L", name).shape[1:])
    return (MODES[mode], *size)


def _probe_parquet(path: Path, mode: str, size: tuple[int, int] | None) -> tuple[str, tuple[int, ...] | None]:
    from raeflow.data.sources import parquet_schema

    schema = parquet_schema(path)
    if ("text" in schema.names) == ("image" in schema.names):
        raise InputError(f"{path}: needs exactly one of the columns \"text\" (documents) or \"image\" (encoded "
                         f"images or pixel arrays); it has {schema.names}")
    if "text" in schema.names:
        return "text", None
    t = schema.field("image").type
    t = t.storage_type if isinstance(t, pa.ExtensionType) else t
    first = pq.ParquetFile(path).read_row_group(0, columns=["image"]).column(0)[0].as_py()
    if isinstance(first, dict):  # Hugging Face's {bytes, path} image struct
        first = first.get("bytes")
    if isinstance(first, (bytes, bytearray)):
        return "image", _encoded_shape(bytes(first), f"{path.name} row 0", mode, size)
    if pa.types.is_fixed_size_list(t) and not is_list(t.value_type):
        d = t.list_size
    else:
        a = np.asarray(first, dtype=object if first is None else None)
        if a.ndim in (2, 3) and a.dtype != object:  # nested (H, W) or (C, H, W): the array's own shape
            return "image", ((1,) if a.ndim == 2 else ()) + tuple(int(v) for v in a.shape)
        d = int(a.size)
    if size is not None:
        c = d // (size[0] * size[1]) if size[0] * size[1] else 0
        if c in (1, 3) and c * size[0] * size[1] == d:
            return "image", (c, *size)
        raise InputError(f"{path.name} row 0: wrong shape: {d} values do not make a 1- or 3-channel {size} image")
    for c in (1, 3):
        s = math.isqrt(d // c)
        if c * s * s == d and s:
            return "image", (c, s, s)
    raise InputError(f"{path.name} row 0: wrong shape: {d} values do not make a square 1- or 3-channel image "
                     "(pass size=(H, W))")


def refuse_bad_rows(batch: pa.Table) -> None:
    """Training's rule for a row the readers could not read: stop, naming it (embed writes it to _errors/)."""
    errors = batch.column(ERROR).drop_null()
    if len(errors):
        raise InputError(f"{errors[0].as_py()} ({len(errors)} bad row(s) in this block; fix or remove them)")


def train_rows(batch: pa.Table, *, val: bool, fraction: float, shape: tuple[int, ...],
               vectoriser: dict | None = None) -> dict[str, np.ndarray]:
    """:class:`TrainRows` as a function: what the Ray Data tasks run (tasks, not an actor pool: nothing is worth
    keeping between blocks, and an actor pool would be started again every epoch)."""
    return TrainRows(val=val, fraction=fraction, shape=shape, vectoriser=vectoriser)(batch)


class TrainRows:
    """One block of a source's rows -> the training rows of one split: ``{"x": (N, *shape)}``, uint8 or float32.

    A row with an error stops training with that row's message (the in-memory read refuses a bad file the same
    way: one rule for both paths). Rows are kept when :func:`in_validation` of their id says ``val``; documents
    are vectorised (dense for this block only). uint8 pixels stay uint8: a quarter of float32's bytes in the
    object store, in every block in flight and in the workers' shuffle buffers; the worker scales each batch
    (:func:`as_float`), as the in-memory read does (bytes / 255).
    """

    def __init__(self, *, val: bool, fraction: float, shape: tuple[int, ...], vectoriser: dict | None = None):
        self.val, self.fraction, self.shape = val, fraction, tuple(shape)
        self.vectoriser = None
        if vectoriser is not None:
            from raeflow.data.text import Vectoriser

            self.vectoriser = Vectoriser.from_json(vectoriser)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        refuse_bad_rows(batch)
        keep = in_validation(batch.column(ID).to_pylist(), self.fraction) == self.val
        rows = batch.filter(pa.array(keep))
        if self.vectoriser is not None:
            x = self.vectoriser.transform(rows.column(TEXT).to_pylist()) if rows.num_rows else \
                np.zeros((0, *self.shape), np.float32)
        else:
            col = rows.column(X).combine_chunks()
            # Width from the shape, not -1: a block with no row in this split (common at a small validation
            # fraction) has 0 values, which reshape(0, -1) refuses.
            flat = col.flatten().to_numpy(zero_copy_only=False).reshape(rows.num_rows, int(np.prod(self.shape)))
            x = flat if flat.dtype == np.uint8 else flat.astype(np.float32)
        return {"x": x.reshape(len(x), *self.shape)}


def as_float(x):
    """A batch of streamed training rows as float32: uint8 pixels are bytes / 255 (the in-memory rule), float
    rows pass through. Takes and returns an ndarray or a torch tensor."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x
    import torch

    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _count_stems(batch: pa.Table, *, fraction: float, vocab_size: int, weighting: str) -> pa.Table:
    """One block's stem counts over its training documents (a Ray Data task of the streamed vocabulary pass)."""
    from raeflow.data.text import Vectoriser

    refuse_bad_rows(batch)
    held = in_validation(batch.column(ID).to_pylist(), fraction)
    docs = [d for d, v in zip(batch.column(TEXT).to_pylist(), held) if not v]
    counts, df, n = Vectoriser(vocab_size, weighting).count(docs)
    stems = sorted(counts)
    # One more row, with a null stem: the block's count of training documents (so the driver learns the split's
    # size from this same pass, without reading the corpus again).
    return pa.table({"stem": pa.array([*stems, None], pa.string()),
                     "count": pa.array([*(counts[s] for s in stems), n], pa.int64()),
                     "df": pa.array([*(df[s] for s in stems), 0], pa.int64())})


@dataclass
class StreamedSplit:
    """What the trainer asks of a split (its size, shape, name, meta) without its rows."""

    name: str
    split: str
    kind: str
    shape: tuple[int, ...]
    n: int
    classes: list[str] | None = None
    y: None = None  # labels are not carried through a streamed run (its plots are unlabelled)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.n

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "input_shape": list(self.shape), "classes": self.classes,
                "preprocessing": self.preprocessing}


@dataclass
class StreamedData:
    """A corpus to stream: the source, the split rule, the counts, and (documents) the fitted vectoriser."""

    source: Any
    train: StreamedSplit
    val: StreamedSplit | None
    fraction: float
    vectoriser: Any = None
    plot_sample: ArrayDataset | None = None  # a few validation rows, read while Ray is up (see sample())

    def datasets(self, shuffle_seed: int | None = None) -> dict[str, Any]:
        """The Ray Datasets the workers shard: ``train`` (and ``val``) as ``{"x"}`` rows. With ``shuffle_seed``
        the training units are read in a new random order every epoch (the workers' local shuffle buffer then
        mixes rows across the blocks in flight)."""
        vec = None if self.vectoriser is None else self.vectoriser.to_json()
        out = {}
        for name, split in (("train", self.train), ("val", self.val)):
            if split is None or split.n == 0:
                continue
            seed = shuffle_seed if name == "train" else None
            out[name] = self.source.dataset(pa.array([], pa.string()), seed).map_batches(
                train_rows, fn_kwargs={"val": name == "val", "fraction": self.fraction, "shape": split.shape,
                                       "vectoriser": vec},
                batch_format="pyarrow", batch_size=None)
        return out

    def sample(self, n: int = 2000) -> ArrayDataset:
        """Up to ``n`` validation rows (else training rows) in memory: for the run's plots."""
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-execution INFO lines
        ds = self.datasets()
        name = "val" if "val" in ds else "train"
        rows = ds[name].take_batch(n, batch_format="numpy")
        split = self.val if name == "val" else self.train
        return ArrayDataset(split.name, name, np.asarray(as_float(rows["x"]), np.float32), None, None, split.kind, None,
                            dict(split.preprocessing))


def in_memory_bytes(data: Any) -> int:
    """Bytes of training data the driver puts into Ray (none when streamed: tasks read the files)."""
    if isinstance(data, StreamedData):
        return 0
    return data.train.x.nbytes + (0 if data.val is None else data.val.x.nbytes)


def estimated_bytes(spec: str, kind: str, shape: tuple[int, ...] | None, rows: int) -> int:
    """The bytes a corpus would take read into memory: images as float32 rows; documents as their text plus
    their sparse vectors (at most about as many bytes again), i.e. twice the input's size on disk."""
    if kind == "text":
        root = Path(spec)
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
        return 2 * sum(p.stat().st_size for p in files)
    return 4 * rows * int(np.prod(shape))


def choose_read(mode: str, spec: str) -> tuple[str, str]:
    """``(memory | stream, why)`` for ``data.read`` = ``mode``. Built-in datasets are always read into memory."""
    from raeflow.data.catalog import known_datasets, parse_spec

    if mode not in READ_MODES:
        raise InputError(f"data.read={mode!r}: choose one of {', '.join(READ_MODES)}")
    if parse_spec(spec)[0] in known_datasets() and not Path(spec).exists():
        if mode == "stream":
            raise InputError(f"data.read=stream: {spec} is a built-in dataset (read into memory); stream a "
                             "corpus on disk (raeflow corpus writes one)")
        return "memory", "built-in dataset"
    root = Path(spec)
    if not root.exists():
        return "memory", "not found"  # the in-memory read names what is missing (path or dataset) as it always has
    if not root.is_dir():
        from raeflow.io import regular_file

        regular_file(root, 1 << 62, "a data file")  # a FIFO or a device named like data would hang the first read
    if mode != "auto":
        return mode, f"data.read={mode}"
    kind, shape = probe(spec)
    rows = _row_count(spec)
    need, budget = estimated_bytes(spec, kind, shape, rows), data_budget()
    if need > STREAM_ABOVE * budget:
        return "stream", (f"{rows:,} rows would take {need / 2**30:.1f} GiB in memory, over {STREAM_ABOVE:.0%} of the "
                          f"{budget / 2**30:.1f} GiB data budget")
    return "memory", f"{rows:,} rows, {need / 2**20:,.0f} MiB in memory"


def _row_count(spec: str) -> int:
    """Rows of a user corpus from metadata and listings (JSONL: its lines)."""
    root = Path(spec)
    if root.is_dir():
        kind, rels = classify_folder(root)
        if kind == "parquet":
            return sum(pq.ParquetFile(root / r).metadata.num_rows for r in rels)
        return len(rels)
    if root.suffix.lower() == ".parquet":
        return pq.ParquetFile(root).metadata.num_rows
    with open(root, "rb") as f:
        return sum(1 for line in f if line.strip())


def open_streamed(spec: str, val_size: int | float | None = None, *, vocab_size: int = 2000,
                  weighting: str = "log", log=print) -> StreamedData:
    """Resolve a user corpus for a streamed run: probe it, count the split, fit the vocabulary (documents) by a
    streamed count in Ray tasks. Needs Ray (the counting pass of documents runs on it)."""
    from raeflow.data.sources import open_source

    kind, shape = probe(spec)
    name = str(spec)
    rows = _row_count(spec)
    fraction = validation_fraction(rows, val_size)
    vec = None
    if kind == "text":
        from raeflow.data.text import Vectoriser

        source = open_source(spec, Prep("text", (vocab_size,)))
        counts, df = Counter(), Counter()
        stems = source.dataset(pa.array([], pa.string())).map_batches(
            _count_stems, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"fraction": fraction, "vocab_size": vocab_size, "weighting": weighting})
        n_train = 0
        for b in stems.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stem, c, d in zip(b["stem"].to_pylist(), b["count"].to_pylist(), b["df"].to_pylist()):
                if stem is None:  # the block's training documents (see _count_stems)
                    n_train += c
                else:
                    counts[stem] += c
                    df[stem] += d
        vec = Vectoriser(vocab_size, weighting)
        vec.fit_counts(counts, df, n_train)
        shape = (len(vec.vocabulary),)
        source.prep = Prep("text", shape)
        n_val = rows - n_train
        prep = {"vectoriser": vec.describe(), "read": "streamed"}
    else:
        source = open_source(spec, Prep("image", shape))
        ids = _ids(source)
        held = int(sum(in_validation(chunk, fraction).sum() for chunk in ids))
        n_train, n_val = rows - held, held
        prep = {"pixels": "bytes/255", "read": "streamed"}
    if n_train == 0:
        raise InputError(f"{spec}: all {rows} rows fell in the validation split")
    log(f"data: {spec} streamed: {rows:,} rows, train {n_train:,} / val {n_val:,} (hash of each row's id)")
    train = StreamedSplit(name, "train", kind, tuple(shape), n_train, preprocessing=prep)
    val = StreamedSplit(name, "val", kind, tuple(shape), n_val, preprocessing=prep) if n_val else None
    return StreamedData(source, train, val, fraction, vec)


def _ids(source) -> Any:
    """The row ids of an image source, a chunk at a time, read in the driver without the pixels: a folder's
    are its listing, Parquet's its ``id`` column (or row positions)."""
    from raeflow.data.sources import FolderSource

    if isinstance(source, FolderSource):
        yield source.files
        return
    for path, prefix in source.files:
        pf = pq.ParquetFile(path)
        first = 0
        if source.id_column:
            for b in pf.iter_batches(batch_size=1 << 16, columns=[source.id_column]):
                col = b.column(0)
                ids = [f"{prefix}{first + i}" if v is None else str(v) for i, v in enumerate(col.to_pylist())]
                first += len(ids)
                yield ids
        else:
            n = pf.metadata.num_rows
            for a in range(0, n, 1 << 16):
                yield [f"{prefix}{i}" for i in range(a, min(n, a + (1 << 16)))]
