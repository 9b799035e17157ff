"""The inputs of ``raeflow embed`` as Ray Data streams of decoded rows.

Every source yields blocks with the columns of :mod:`raeflow.data.rows`: ``id``, ``label`` (null when the
source has none), ``error`` (null for a good row) and the input — ``x`` for images (a ``fixed_size_list`` of the
model's ``C*H*W`` values, float32 in [0, 1] or uint8 bytes) or ``text`` for documents. A row that cannot be read
or decoded keeps its id and gets an ``error`` instead of failing its block: the job writes it to the errors
table, so every input row is accounted for.

Sources (``open_source`` picks one from the ``--input`` string):

* built-in datasets by name, ``mnist:test``, ``20newsgroups:test`` — ids ``<dataset>:<split>:<index>``;
* a folder tree of images or of ``.txt`` documents — ids are paths relative to the folder; the top-level
  subfolder is the label when every file sits in one (the data layer's rule);
* Parquet (a file or a folder of them) with an image column (encoded bytes, or arrays of floats in [0, 1] or
  uint8 bytes) or a text column — ids from ``id_column`` (default ``id`` when present), else the row number
  (``<file>#<row>`` in a folder), as the data layer numbers them;
* JSONL with a text field — ids from the id field, else the document's index.

Only file names are listed on the driver (resume needs them); contents are read by Ray tasks in blocks, so
memory does not grow with the corpus. Folder and Parquet inputs are read by path: on a multi-node cluster they
must sit on storage every node mounts. The per-block readers are plain Python in :mod:`raeflow.data.readers`
(tested without Ray); ``Source.dataset`` here wires them into Ray Data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raeflow.data.readers import (BLOCK_ROWS, PATHS_PER_BLOCK, SUPPORTED, Prep, check_texts, classify_folder,
                                   decode_image_files, is_list, read_input_file, read_jsonl,
                                   read_parquet_units,
                                   read_text_files, rows_table)
from raeflow.errors import InputError, MissingFileError


#: No committed rows: a fresh read (an immutable Arrow array, safe as a default argument).
_NONE = pa.array([], pa.string())


def parquet_schema(path: str | Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None


# ----------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One ``--input``: its kind, what ``raeflow.input`` records, and how many rows it holds (None: unknown
    until read). ``dataset(done)`` builds the Ray Data stream of rows whose ids are not in ``done``."""

    kind: str
    spec: str
    total: int | None
    prep: Prep

    def todo(self, done: pa.Array) -> int | None:
        return None if self.total is None else self.total - len(done)

    def blocks(self, done: pa.Array = _NONE) -> Iterator[pa.Table]:  # pragma: no cover - abstract
        """The same rows as :meth:`dataset`, read here in this process by the same plain readers (no Ray): the
        in-memory read of a small corpus."""
        raise NotImplementedError

    def dataset(self, done: pa.Array, shuffle_seed: int | None = None):  # pragma: no cover - abstract
        """``shuffle_seed``: read the units (files, row groups, path chunks) in a random order, another one each
        time the dataset is executed (each training epoch), reproducible from the seed."""
        raise NotImplementedError




def _from_arrow_chunks(table: pa.Table, rows: int, shuffle_seed: int | None = None):
    import ray.data

    chunks = [table.slice(s, rows) for s in range(0, table.num_rows, rows)] or [table]
    return _shuffled(ray.data.from_arrow(chunks), shuffle_seed)


def _shuffled(units, seed: int | None):
    """The units of work in a random block order, re-drawn per execution (epoch) from ``seed``: only the small
    table of units is shuffled (Ray materialises what it shuffles), never the decoded rows."""
    if seed is None:
        return units
    from ray.data import RandomSeedConfig

    return units.randomize_block_order(seed=RandomSeedConfig(seed=int(seed), reseed_after_execution=True))


@dataclass
class FolderSource(Source):
    root: Path = Path(".")
    files: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.files) and all("/" in f for f in self.files)

    def pending(self, done: pa.Array) -> list[str]:
        if not len(done):
            return self.files
        seen = set(done.to_pylist())
        return [f for f in self.files if f not in seen]

    def todo(self, done: pa.Array) -> int:
        return len(self.pending(done))

    def _read_block(self):
        if self.kind == "image":
            return functools.partial(decode_image_files, root=str(self.root), prep=self.prep, labelled=self.labelled)
        return functools.partial(read_text_files, root=str(self.root), labelled=self.labelled)

    def blocks(self, done: pa.Array = _NONE) -> Iterator[pa.Table]:
        paths = self.pending(done)
        for a in range(0, len(paths), PATHS_PER_BLOCK):
            yield self._read_block()(pa.table({"path": pa.array(paths[a:a + PATHS_PER_BLOCK], pa.string())}))

    def dataset(self, done: pa.Array, shuffle_seed: int | None = None):
        paths = pa.table({"path": pa.array(self.pending(done), pa.string())})
        ds = _from_arrow_chunks(paths, PATHS_PER_BLOCK, shuffle_seed)
        return ds.map_batches(self._read_block(), batch_format="pyarrow", batch_size=None)


@dataclass
class BuiltinSource(Source):
    name: str = ""
    split: str = ""

    def _table(self, done: pa.Array) -> pa.Table:
        from raeflow.data.catalog import known_datasets

        raw = known_datasets()[self.name].load(self.split)
        n = len(raw.x)
        keep = np.ones(n, bool)
        if len(done):
            prefix = f"{self.name}:{self.split}:"
            idx = [int(s[len(prefix):]) for s in done.to_pylist() if s.startswith(prefix)]
            keep[np.asarray(idx, np.int64)] = False
        rows = np.flatnonzero(keep)
        ids = [f"{self.name}:{self.split}:{i}" for i in rows]
        labels = ([None] * len(rows) if raw.y is None or raw.classes is None
                  else [raw.classes[int(raw.y[i])] for i in rows])
        if self.kind == "text":
            texts, errors = check_texts([raw.x[i] for i in rows], ids)
            return rows_table(ids, labels, errors, text=texts)
        x = np.asarray(raw.x)
        if tuple(x.shape[1:]) != self.prep.input_shape:
            raise InputError(f"{self.name} images are {tuple(x.shape[1:])} but the model takes "
                             f"{self.prep.input_shape}: embed a dataset of the model's shape")
        return rows_table(ids, labels, [None] * len(rows), x=x[rows].reshape(len(rows), -1))

    def blocks(self, done: pa.Array = _NONE) -> Iterator[pa.Table]:
        yield from self._table(done).to_batches(BLOCK_ROWS)

    def dataset(self, done: pa.Array, shuffle_seed: int | None = None):
        return _from_arrow_chunks(self._table(done), BLOCK_ROWS, shuffle_seed)


def _resolving_done(reader, batch: pa.Table, *, done: Any = None, **kwargs: Any) -> Iterator[pa.Table]:
    """Run a plain reader in a Ray task, first fetching ``done`` when it came as an ObjectRef (how the job ships
    a large set of committed ids once, instead of once per task): the Ray side of the plain readers."""
    if done is not None and not isinstance(done, (pa.Array, pa.ChunkedArray)):
        import ray

        done = ray.get(done)
    yield from reader(batch, done=done, **kwargs)


@dataclass
class ParquetSource(Source):
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, id prefix for default ids)
    column: str = ""
    id_column: str | None = None
    label_column: str | None = None
    x_dtype: str = "float32"

    def units(self) -> pa.Table:
        """One row per (file, row group): the unit a read task takes."""
        f_idx, groups, firsts = [], [], []
        for i, (path, _) in enumerate(self.files):
            md = pq.ParquetFile(path).metadata
            first = 0
            for g in range(md.num_row_groups):
                f_idx.append(i)
                groups.append(g)
                firsts.append(first)
                first += md.row_group(g).num_rows
        return pa.table({"file": pa.array(f_idx, pa.int32()), "row_group": pa.array(groups, pa.int32()),
                         "first_row": pa.array(firsts, pa.int64())})

    def read_kwargs(self, done: Any) -> dict[str, Any]:
        return {"files": self.files, "column": self.column, "id_column": self.id_column,
                "label_column": self.label_column, "prep": self.prep, "kind": self.kind,
                "x_dtype": self.x_dtype, "done": done}

    def blocks(self, done: pa.Array = _NONE) -> Iterator[pa.Table]:
        yield from read_parquet_units(self.units(), **self.read_kwargs(done))

    def dataset(self, done: pa.Array, shuffle_seed: int | None = None):
        import ray
        import ray.data

        units = self.units()
        ds = _shuffled(ray.data.from_arrow([units.slice(i, 1) for i in range(units.num_rows)]), shuffle_seed)
        ref = ray.put(done) if len(done) else None  # shipped once, fetched by each task
        return ds.map_batches(functools.partial(_resolving_done, read_parquet_units), batch_format="pyarrow",
                              batch_size=1,
                              fn_kwargs=self.read_kwargs(ref))




@dataclass
class JsonlSource(Source):
    path: Path = Path(".")
    text_field: str = "text"
    id_field: str | None = "id"
    label_field: str | None = "label"

    def _kwargs(self, done: Any) -> dict[str, Any]:
        return {"text_field": self.text_field, "id_field": self.id_field, "label_field": self.label_field,
                "done": done}

    def blocks(self, done: pa.Array = _NONE) -> Iterator[pa.Table]:
        yield from read_jsonl(pa.table({"path": [str(self.path)]}), **self._kwargs(done))

    def dataset(self, done: pa.Array, shuffle_seed: int | None = None):  # one file: one unit, nothing to shuffle
        import ray
        import ray.data

        ref = ray.put(done) if len(done) else None
        return ray.data.from_arrow(pa.table({"path": [str(self.path)]})).map_batches(
            functools.partial(_resolving_done, read_jsonl), batch_format="pyarrow", batch_size=1,
            fn_kwargs=self._kwargs(ref))




# ------------------------------------------------------------------------------------------- open_source
def open_source(spec: str, prep: Prep, *, id_column: str | None = None, text_column: str | None = None,
                image_column: str | None = None, label_column: str | None = "label") -> Source:
    """Resolve ``--input``: a built-in dataset (``name`` or ``name:split``, default split ``test``) or a path."""
    from raeflow.data.catalog import builtin_split, known_datasets, parse_spec

    datasets = known_datasets()
    name, split = parse_spec(spec)
    if name in datasets and not Path(spec).exists():
        split = split or "test"
        ds = builtin_split(name, split)
        _check_kind(ds.kind, prep, spec)
        src = BuiltinSource(ds.kind, f"{name}:{split}", None, prep, name=name, split=split)
        src.total = len(ds.load(split).x)
        return src
    root = Path(spec)
    if not root.exists():
        known = ", ".join(sorted(datasets))
        raise MissingFileError(f"--input {spec!r}: no such file or folder, nor a built-in dataset ({known})")
    root = root.resolve()
    if root.is_dir():
        kind, rels = classify_folder(root)
        if kind in ("image", "text"):
            _check_kind(kind, prep, spec)
            return FolderSource(kind, str(root), len(rels), prep, root=root, files=rels)
        return _parquet_source(str(root), [(str(root / r), f"{r}#") for r in rels], prep, id_column, text_column,
                               image_column, label_column)
    try:  # a FIFO or a device named like a data file would hang the first read
        read_input_file(root.parent, root.name, 1 << 62, read=False)
    except ValueError as e:
        raise InputError(f"--input {e}") from None
    suffix = root.suffix.lower()
    if suffix == ".parquet":
        return _parquet_source(str(root), [(str(root), "")], prep, id_column, text_column, image_column,
                               label_column)
    if suffix == ".jsonl":
        _check_kind("text", prep, spec)
        return JsonlSource("text", str(root), None, prep, path=root, text_field=text_column or "text",
                           id_field=id_column or "id", label_field=label_column)
    raise InputError(f"{root}: unsupported file type {suffix or '(no extension)'}; supported: {SUPPORTED}, or a "
                     "built-in dataset name")


def _check_kind(kind: str, prep: Prep, spec: str) -> None:
    if kind != prep.kind:
        raise InputError(f"--input {spec} holds {'documents' if kind == 'text' else 'images'} but the model is "
                         f"a{'n image' if prep.kind == 'image' else ' document'} model "
                         f"(input shape {list(prep.input_shape)})")


def _parquet_source(spec: str, files: list[tuple[str, str]], prep: Prep, id_column: str | None,
                    text_column: str | None, image_column: str | None, label_column: str | None) -> ParquetSource:
    schemas = [parquet_schema(p) for p, _ in files]
    wanted = (text_column or "text") if prep.kind == "text" else (image_column or "image")
    flag = "--text-column" if prep.kind == "text" else "--image-column"
    for (p, _), s in zip(files, schemas):
        if wanted not in s.names:
            raise InputError(f"{p}: no column {wanted!r} for this {prep.kind} model (columns: {s.names}); "
                             f"name it with {flag}")
        if id_column and id_column not in s.names:
            raise InputError(f"{p}: no id column {id_column!r} (columns: {s.names})")
    if id_column is None and all("id" in s.names for s in schemas):
        id_column = "id"
    if label_column and not all(label_column in s.names for s in schemas):
        label_column = None
    # Keep uint8 pixels as bytes through Ray (4x less data than float32); the encoder divides by 255.
    def is_u8(t: pa.DataType) -> bool:
        t = t.storage_type if isinstance(t, pa.ExtensionType) else t
        return is_list(t) and t.value_type == pa.uint8()

    x_dtype = "uint8" if all(is_u8(s.field(wanted).type) for s in schemas) else "float32"
    total = sum(pq.ParquetFile(p).metadata.num_rows for p, _ in files)
    return ParquetSource(prep.kind, spec, total, prep, files=files, column=wanted, id_column=id_column,
                         label_column=label_column, x_dtype=x_dtype)
