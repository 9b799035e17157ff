"""Reading and decoding the inputs of ``raeflow embed``, one block at a time: plain Python, no Ray.

Every function here takes a batch of work (paths, Parquet row groups, a JSONL file) and yields
``pyarrow`` tables with the columns of :mod:`raeflow.data.rows`: ``id``, ``label`` (null when the source
has none), ``error`` (null for a good row) and the input — ``x`` for images (a ``fixed_size_list`` of the
model's ``C*H*W`` values, float32 in [0, 1] or uint8 bytes) or ``text`` for documents. A row that cannot be read
or decoded keeps its id and gets an ``error`` instead of failing its block, so every input row is accounted for.
:mod:`raeflow.data.sources` wires these functions into Ray Data; the tests call them directly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raeflow.data.text import check_document, read_text_file
from raeflow.data.decode import IMAGE_EXTS, MAX_IMAGE_FILE_BYTES, decode_image
from raeflow.data.rows import ERROR, ID, LABEL, SOURCE, TEXT, X
from raeflow.errors import InputError


#: Rows per block a read task emits: big enough to amortise per-block overhead, small enough that a block of
#: decoded 224x224 RGB images stays under ~150 MB.
BLOCK_ROWS = 4096
#: File paths per block in folder sources (each path becomes one decoded image).
PATHS_PER_BLOCK = 256


class RowNames(Sequence[str]):
    """``"part-0.parquet row 17"`` for each row of a block, made only when asked: a message needs one name, a
    block has thousands of rows (formatting every name up front took half of a streamed epoch's read time)."""

    def __init__(self, file: str, rows: np.ndarray):
        self.file, self.rows = file, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.file} row {int(self.rows[i])}"


@dataclass(frozen=True)
class Prep:
    """What the model takes, from its config.json: decides resizing, colour mode and the text/image path."""

    kind: str  # "image" | "text"
    input_shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.input_shape[1]), int(self.input_shape[2])

    @property
    def mode(self) -> str:
        from raeflow.artifact import InputSpec

        return str(InputSpec("image", self.input_shape).mode)

    @classmethod
    def from_artifact(cls, art: Any) -> "Prep":
        """From a :class:`~raeflow.artifact.TrainedModel`'s input spec (text models read ``text``)."""
        shape, kind = art.input.shape, art.input.kind
        kind = "text" if kind in ("text", "vector") and len(shape) == 1 else kind
        if kind == "image" and len(shape) != 3:
            raise InputError(f"an image model must take (C, H, W) inputs; this one takes {list(shape)}")
        return cls(kind, shape)


# --------------------------------------------------------------------------------------------- memory
_MALLOC_FIXED = False


def bounded_malloc() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB in this (Ray worker) process. Once per process.

    glibc raises the threshold after large blocks are freed, so later multi-MB buffers (decoded batches, torch
    activations) come from the heap and are not given back: measured here, the encoder actor's RSS grew by
    ~8 MB per 1,024-row batch (to 2 GB at 200k rows) while the same calls in a plain loop stayed flat. With the
    threshold fixed it stays ~0.6 GB at any corpus size. No-op off glibc (macOS, musl).
    """
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return
    _MALLOC_FIXED = True
    fix_malloc(128 * 1024)


def fix_malloc(mmap_threshold: int, trim_threshold: int | None = None) -> None:
    """Fix glibc's mmap threshold (and, when given, its trim threshold) in this process, which also stops glibc
    adjusting them as it goes. The one place raeflow sets its allocator: :func:`bounded_malloc` for readers and
    encoders, :func:`raeflow.train.ray_engine.steady_malloc` for training workers. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(mmap_threshold))  # -3: M_MMAP_THRESHOLD
        if trim_threshold is not None:
            libc.mallopt(-1, int(trim_threshold))  # -1: M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------- tables
def rows_table(ids: Sequence[str], labels: Sequence[str | None] | pa.Array, errors: Sequence[str | None],
               *, x: np.ndarray | None = None, text: Sequence[str | None] | None = None,
               sources: Sequence[str] | pa.Array | None = None) -> pa.Table:
    """One block: ``x`` is ``(N, D)`` (rows with an error hold anything), or ``text`` (None for error rows).
    ``sources``: each row's position in the input (see :data:`~raeflow.data.rows.SOURCE`); default the ids,
    for inputs whose ids are positions (folders, built-in datasets)."""
    err = pa.array(list(errors), pa.string())
    id_arr = pa.array(list(ids), pa.string())
    src = id_arr if sources is None else (sources if isinstance(sources, pa.Array)
                                          else pa.array(list(sources), pa.string()))
    cols: dict[str, Any] = {ID: id_arr,
                            LABEL: labels if isinstance(labels, pa.Array) else pa.array(list(labels), pa.string()),
                            SOURCE: src, ERROR: err}
    if x is not None:
        from raeflow.data.rows import to_vectors

        bad = np.asarray(err.is_valid().to_numpy(zero_copy_only=False), bool)
        if x.dtype == np.uint8:
            cols[X] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1], mask=pa.array(bad))
        else:
            cols[X] = to_vectors(x, bad)
    if text is not None:
        cols[TEXT] = pa.array(list(text), pa.string())
    return pa.table(cols)


def _error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------- per-item decoding
def decode_images(items: Sequence[tuple[str, Any]], prep: Prep) -> tuple[np.ndarray, list[str | None]]:
    """``(name, encoded bytes | None | the exception that stopped reading it)`` pairs -> ``(N, D)`` float32 and
    per-row errors (the data layer's :func:`~raeflow.data.decode.decode_image`, resized to the model's size and
    converted to its mode)."""
    x = np.zeros((len(items), prep.dim), np.float32)
    errors: list[str | None] = []
    for i, (name, data) in enumerate(items):
        try:
            if isinstance(data, BaseException):
                raise data
            if data is None:
                raise InputError(f"{name}: no image (null)")
            x[i] = decode_image(data, prep.size, prep.mode, name).reshape(-1)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - any failure of one file is that row's error, never the job's
            errors.append(_error_text(e))
    return x, errors


def folder_label(rel: str, labelled: bool) -> str | None:
    return rel.split("/", 1)[0] if labelled else None


def decode_image_files(batch: pa.Table, *, root: str, prep: Prep, labelled: bool) -> pa.Table:
    """A block of relative ``path``\\ s under ``root`` -> decoded image rows."""
    bounded_malloc()
    rels = batch.column("path").to_pylist()
    items: list[tuple[str, Any]] = []
    for rel in rels:
        try:
            items.append((rel, read_input_file(root, rel, MAX_IMAGE_FILE_BYTES)))
        except ValueError as e:  # not a regular file, too large, an undecodable name
            items.append((rel, e))
        except OSError as e:  # vanished or unreadable since it was listed
            items.append((rel, ValueError(f"{rel}: cannot read ({e.strerror or e})")))
    x, errors = decode_images(items, prep)
    return rows_table(rels, [folder_label(r, labelled) for r in rels], errors, x=x)


def read_text_files(batch: pa.Table, *, root: str, labelled: bool) -> pa.Table:
    """A block of relative ``path``\\ s under ``root`` -> document rows (the data layer's ``read_text_file``:
    UTF-8, non-empty)."""
    bounded_malloc()
    rels = batch.column("path").to_pylist()
    texts, errors = [], []
    for rel in rels:
        try:
            read_input_file(root, rel, MAX_TEXT_FILE_BYTES, read=False)  # a FIFO or /dev/zero never ends a read
            texts.append(read_text_file(Path(root) / rel))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one unreadable document is that row's error
            texts.append(None)
            errors.append(_error_text(e).replace(str(Path(root) / rel), rel, 1))
    return rows_table(rels, [folder_label(r, labelled) for r in rels], errors, text=texts)


def check_texts(values: Sequence[Any], names: Sequence[str]) -> tuple[list[str | None], list[str | None]]:
    texts, errors = [], []
    for v, n in zip(values, names):
        try:
            texts.append(check_document(v, n))
            errors.append(None)
        except ValueError as e:
            texts.append(None)
            errors.append(str(e))
    return texts, errors


def _unwrap(col: pa.Array) -> pa.Array:
    """Arrow's or Ray's tensor extension types and Hugging Face's {bytes, path} struct -> their storage."""
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = col.field("bytes")
    return col


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def array_images(col: pa.Array, names: Sequence[str], prep: Prep, out_dtype: Any) -> tuple[np.ndarray, list]:
    """An image column of arrays (flat ``C*H*W`` lists, or nested ``(H, W)`` / ``(C, H, W)``) -> ``(N, D)`` and
    per-row errors. Floats must be finite in [0, 1]; integers are bytes (0..255, divided by 255 by the encoder
    when uint8 is kept). Arrays are not resized: a row of another size is that row's error."""
    col = _unwrap(col)
    n, d = len(col), prep.dim
    x = np.zeros((n, d), out_dtype)
    errors: list[str | None] = [None] * n
    flat = is_list(col.type) and not is_list(col.type.value_type)
    if flat:
        lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
        good = np.flatnonzero(lengths == d)
        values = col.take(pa.array(good)).flatten().to_numpy(zero_copy_only=False).reshape(len(good), d)
        rows = dict(zip(good.tolist(), range(len(good))))
        for i in np.flatnonzero(lengths != d).tolist():
            errors[i] = (f"{names[i]}: no image (null)" if lengths[i] < 0 else
                         f"{names[i]}: wrong shape: {lengths[i]} values, the model takes {d} "
                         f"{tuple(prep.input_shape)} (arrays are not resized)")
    else:
        rows, arrays = {}, []
        for i, v in enumerate(col.to_pylist()):
            try:
                a = np.asarray(v) if v is not None else None
                if a is None:
                    raise InputError(f"{names[i]}: no image (null)")
                if a.dtype == object or a.size != d or not np.issubdtype(a.dtype, np.number):
                    raise InputError(f"{names[i]}: wrong shape {a.shape}: the model takes {tuple(prep.input_shape)} "
                                     "(arrays are not resized)")
                rows[i] = len(arrays)
                arrays.append(a.reshape(-1))
            except ValueError as e:
                errors[i] = str(e)
        values = np.stack(arrays) if arrays else np.zeros((0, d), np.float32)
    if len(values):
        idx = np.fromiter(rows.keys(), np.int64, len(rows))
        if np.issubdtype(values.dtype, np.floating):
            lo, hi = values.min(axis=1), values.max(axis=1)
            bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo >= 0) & (hi <= 1))
            scale = 1.0
        else:
            lo, hi = values.min(axis=1), values.max(axis=1)
            bad = (lo < 0) | (hi > 255)
            scale = 255.0
        for j in np.flatnonzero(bad).tolist():
            i = int(idx[j])
            unit = "finite and in [0, 1] (e.g. bytes / 255)" if scale == 1.0 else "bytes in 0..255"
            errors[i] = f"{names[i]}: pixel values must be {unit}; found min {lo[j]:g}, max {hi[j]:g}"
        if out_dtype == np.uint8:
            x[idx] = values.astype(np.uint8, copy=False)
        else:
            x[idx] = values.astype(np.float32) / np.float32(scale) if scale != 1.0 else values
    return x, errors


def _strings_or_nulls(col: pa.Array | None, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, pa.string())
    return col if col.type == pa.string() else pc.cast(col, pa.string())

#: Ids of files whose names are not UTF-8 start with this (a name os.walk can list but Arrow cannot hold): the
#: row becomes an error naming the bytes, instead of the whole job failing on one name.
BAD_NAME = "<file name not UTF-8: "
#: A document file read whole: far above any document, far below memory (images: ``MAX_IMAGE_FILE_BYTES``).
MAX_TEXT_FILE_BYTES = 64 << 20


def safe_name(rel: str) -> str:
    """``rel`` when it is valid UTF-8; else ``BAD_NAME + repr(bytes) + ">"`` (os.walk decodes undecodable bytes to
    lone surrogates, which no Parquet string can hold)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return f"{BAD_NAME}{os.fsencode(rel)!r}>"


def read_input_file(root: str | Path, rel: str, limit: int, read: bool = True) -> bytes | None:
    """The bytes of ``root/rel`` (or, with ``read=False``, just the checks): a ValueError naming the row when its
    name is not UTF-8, or it is not a regular file (a FIFO, a device such as /dev/zero behind a symlink, a
    broken link), or it is larger than ``limit`` -- any of which would hang or exhaust a read."""
    import stat

    if rel.startswith(BAD_NAME):
        raise InputError(f"{rel[len(BAD_NAME):-1]}: the file name is not valid UTF-8; rename the file")
    path = Path(root) / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{rel}: cannot read (no such file: a broken link, or removed since it was listed)") from None
    if not stat.S_ISREG(st.st_mode):
        from raeflow.io import special_file_kind

        raise InputError(f"{rel}: {special_file_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise InputError(f"{rel}: {st.st_size:,} bytes is over the {limit:,}-byte limit per file")
    if not read:
        return None
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _list_files(root: Path) -> list[str]:
    """Relative paths of the files under ``root`` (hidden ones skipped), undecodable names made safe. Every
    entry that is not a folder is listed -- FIFOs, devices, broken links too -- so that each becomes an error
    row naming it rather than a hang or a silent gap."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden folders are not data
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if not f.startswith("."):
                out.append(safe_name((rel_dir / f).as_posix()))
    return sorted(out)


def _kind_of(rel: str) -> str | None:
    ext = Path(rel.rstrip(">'\"") if rel.startswith(BAD_NAME) else rel).suffix.lower()
    return "image" if ext in IMAGE_EXTS else {".txt": "text", ".parquet": "parquet", ".jsonl": "jsonl"}.get(ext)


#: What raeflow reads, for messages about what it does not.
SUPPORTED = (f"a folder of images ({' '.join(IMAGE_EXTS)}), a folder of .txt files, a .jsonl file with a \"text\" "
             "field, or a .parquet file (or a folder of them) with a \"text\" or \"image\" column")


def classify_folder(root: Path) -> tuple[str, list[str]]:
    """``(kind, relative paths)`` of a data folder -- ``image``, ``text`` or ``parquet`` -- the one rule for every
    reader of a folder (train in memory or streamed, embed, search). Files of other types are ignored; a folder of
    none, or of more than one kind, is refused with what it holds."""
    from collections import Counter

    rels = _list_files(root)
    groups: dict[str, list[str]] = {}
    for rel in rels:
        k = _kind_of(rel)
        if k:
            groups.setdefault(k, []).append(rel)
    if not groups:
        found = Counter(Path(rel).suffix.lower() or "(no extension)" for rel in rels)
        what = ", ".join(f"{n} {ext}" for ext, n in found.most_common()) or "it is empty"
        raise InputError(f"{root}: no usable files ({what}); supported: {SUPPORTED}")
    if len(groups) > 1:
        mix = " and ".join(f"{len(v)} {k} files" for k, v in sorted(groups.items()))
        raise InputError(f"{root}: mixes {mix}; a dataset holds one kind, so put them in separate folders")
    kind, rels = groups.popitem()
    if kind == "jsonl":
        raise InputError(f"{root}: a folder of .jsonl files; give one .jsonl file")
    return kind, rels

def read_parquet_units(units: pa.Table, *, files, column, id_column, label_column, prep: Prep, kind: str,
                       x_dtype: str, done: Any, block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Read (file, row group) units -> blocks of decoded rows, skipping rows whose source is in ``done``."""
    bounded_malloc()
    done = done_sources(done)
    for f, g, first in zip(units.column("file").to_pylist(), units.column("row_group").to_pylist(),
                           units.column("first_row").to_pylist()):
        path, prefix = files[f]
        pf = pq.ParquetFile(path)
        file_name = Path(path).name
        names = set(pf.schema_arrow.names)
        cols = [c for c in (column, id_column, label_column) if c and c in names]
        n = pf.metadata.row_group(g).num_rows
        pos = pa.array([f"{prefix}{first + i}" for i in range(n)], pa.string())  # the rows' SOURCE
        if id_column:
            ids = _strings_or_nulls(pf.read_row_group(g, columns=[id_column]).column(0).combine_chunks(), n)
            ids = pc.if_else(ids.is_null(), pos, ids)
        else:
            ids = pos
        ids, dup_errors = _dedupe_array(ids, first, file_name)
        # Skipped by position, not by id: a later row repeating a committed id is still read (and becomes an
        # error row), never silently taken for the committed one.
        keep = (pc.invert(pc.is_in(pos, value_set=done)) if len(done) else None)
        start = 0
        for rb in pf.iter_batches(batch_size=block_rows, row_groups=[g], columns=cols, use_threads=False):
            t = pa.Table.from_batches([rb])
            m = t.num_rows
            bid, bpos = ids.slice(start, m), pos.slice(start, m)
            rows = np.arange(first + start, first + start + m)
            if keep is not None:
                k = keep.slice(start, m)
                t, bid, bpos = t.filter(k), bid.filter(k), bpos.filter(k)
                rows = rows[np.asarray(k.to_numpy(zero_copy_only=False), bool)]
            start += m
            if t.num_rows == 0:
                continue
            where = RowNames(file_name, rows)
            labels = _strings_or_nulls(t.column(label_column).combine_chunks()
                                       if label_column and label_column in t.column_names else None, t.num_rows)
            col = t.column(column).combine_chunks()
            dups = [dup_errors.get(r) for r in rows.tolist()] if dup_errors else None
            if kind == "text":
                texts, errors = check_texts(col.to_pylist(), where)
                if dups:
                    errors = [d or e for d, e in zip(dups, errors)]
                    texts = [None if d else t_ for d, t_ in zip(dups, texts)]
                yield rows_table(bid.to_pylist(), labels, errors, text=texts, sources=bpos)
                continue
            inner = _unwrap(col)
            if pa.types.is_binary(inner.type) or pa.types.is_large_binary(inner.type):
                x, errors = decode_images(list(zip(where, inner.to_pylist())), prep)
            elif is_list(inner.type):
                x, errors = array_images(inner, where, prep, np.uint8 if x_dtype == "uint8" else np.float32)
            else:
                x = np.zeros((t.num_rows, prep.dim), np.float32)
                errors = [f"{w}: the image column must hold encoded image bytes or arrays, found {inner.type}"
                          for w in where]
            if dups:
                errors = [d or e for d, e in zip(dups, errors)]
            yield rows_table(bid.to_pylist(), labels, errors, x=x, sources=bpos)

def read_jsonl(batch: pa.Table, *, text_field: str, id_field: str | None, label_field: str | None, done: Any,
               block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Stream a JSONL file in blocks. Blank lines are skipped; a line that is not a JSON object with a usable
    text is its row's error. Default ids are the document index (blank lines not counted), as the data layer's;
    the index is also the row's source, by which ``done`` (committed sources) is skipped."""
    bounded_malloc()
    done_set = set(done_sources(done).to_pylist())
    for path in batch.column("path").to_pylist():
        ids, labels, texts, errors, sources = [], [], [], [], []
        index = 0
        seen: set[str] = set()  # one file is one task: every duplicate is caught as the rows stream by
        read_input_file(Path(path).parent, Path(path).name, 1 << 62, read=False)  # a FIFO would never end
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{Path(path).name}:{lineno}"
                rid, label, text, err = str(index), None, None, None
                index += 1
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise InputError(f"{where}: expected a JSON object")
                    if id_field and rec.get(id_field) is not None:
                        rid = str(rec[id_field])
                    if label_field and rec.get(label_field) is not None:
                        label = str(rec[label_field])
                    if text_field not in rec:
                        raise InputError(f"{where}: no {text_field!r} field")
                    text = check_document(rec[text_field], where)
                except UnicodeDecodeError as e:
                    err = f"{where}: not UTF-8 text (invalid byte at offset {e.start})"
                except json.JSONDecodeError as e:
                    err = f"{where}: not valid JSON ({e.msg})"
                except ValueError as e:
                    err, text = str(e), None
                pos = str(index - 1)  # the row's SOURCE: resume skips by it (see read_parquet_units)
                rid, dup = dedupe(rid, seen, where)
                if dup:
                    err, text = dup, None
                if pos in done_set:
                    continue
                ids.append(rid)
                sources.append(pos)
                labels.append(label)
                texts.append(text)
                errors.append(err)
                if len(ids) >= block_rows:
                    yield rows_table(ids, labels, errors, text=texts, sources=sources)
                    ids, labels, texts, errors, sources = [], [], [], [], []
        if ids:
            yield rows_table(ids, labels, errors, text=texts, sources=sources)


def dedupe(rid: str, seen: set[str], where: str) -> tuple[str, str | None]:
    """``(id, None)`` the first time ``rid`` is seen; afterwards ``(rid + "#duplicate@" + where, error)``.

    A repeated id is an error row, never a second embedding under the same id: on ``--resume`` every row whose
    id is committed is skipped, so two rows sharing an id would lose the later one silently. The error row's id
    names its position, so it is unique, is committed once, and a resume skips exactly it."""
    if rid in seen:
        return f"{rid}#duplicate@{where}", f"{where}: duplicate id {rid!r} (an earlier row has it); ids must be unique"
    seen.add(rid)
    return rid, None


def _dedupe_array(ids: pa.Array, first: int, name: str) -> tuple[pa.Array, dict[int, str]]:
    """Vectorised :func:`dedupe` over one row group's ids: (new ids, {row number: error})."""
    if len(ids) == 0 or pc.count_distinct(ids).as_py() == len(ids):
        return ids, {}
    out, errors, seen = [], {}, set()
    for i, rid in enumerate(ids.to_pylist()):
        rid, err = dedupe(rid, seen, f"{name} row {first + i}")
        out.append(rid)
        if err:
            errors[first + i] = err
    return pa.array(out, pa.string()), errors


def done_sources(done: pa.Array | pa.ChunkedArray | None) -> pa.Array:
    """The sources of the rows a resumed job already committed (an empty array for none)."""
    return pa.array([], pa.string()) if done is None else done
