"""User data by path, read into memory: a folder of images or ``.txt`` files, a ``.jsonl`` file, or Parquet file(s).

The rules live in the one input layer this module reads through (:mod:`raeflow.data.readers` and
:mod:`raeflow.data.sources`, the same readers a streamed run and ``raeflow embed`` run in Ray Data tasks); what
stays here is the in-memory assembly (images decode by :mod:`raeflow.data.decode`).

A model trains on one input shape, so decoded images are converted to one ``mode`` (``"L"``, the default, or
``"RGB"``) and resized — aspect ratio not kept — to ``size=(H, W)``, by default the size of the first image in
path order. Pixel arrays (Parquet) are taken as they are and must all share one shape.

Labels: in a folder, when every file sits in a subfolder, its top-level subfolder's name is its class; otherwise
there are none. Files and Parquet rows may carry ``label`` and ``id`` fields; ids default to the relative path
(folders), the row number (``<file>#<row>`` in a folder of Parquet files) or the document's index (JSONL).
Hidden files and files of other types in a folder are ignored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from raeflow.data.core import RawSplit, check_budget, data_budget
from raeflow.data.decode import Size, check_options
from raeflow.data.readers import Prep
from raeflow.data.rows import ID, LABEL, SOURCE, TEXT, X
from raeflow.data.sources import open_source
from raeflow.data.stream import as_float, probe, refuse_bad_rows
from raeflow.errors import InputError

def load_user_data(path: str | Path, *, size: Size | None = None, mode: str = "L") -> tuple[str, RawSplit]:
    """``("image" | "text", RawSplit)`` for user data; clear errors naming the file and the problem.

    Read by the one input layer: :func:`raeflow.data.stream.probe` decides what the path holds and its input
    shape, :func:`raeflow.data.sources.open_source` resolves it, and the source's own readers -- the ones a
    streamed run and ``raeflow embed`` run in Ray Data tasks -- read it here, in this process.
    """
    check_options(size, mode)
    kind, shape = probe(str(path), mode, size)
    source = open_source(str(path), Prep(kind, shape or (0,)))
    return kind, read_rows(source, shape)


def read_rows(source: Any, shape: tuple[int, ...] | None) -> RawSplit:
    """Every row of ``source`` in memory, read block by block by its plain readers. A row the readers could not
    read stops the read with its message (:func:`raeflow.data.stream.refuse_bad_rows`, a streamed run's rule).
    Images fill one preallocated float32 array (checked against the data budget first); documents are kept as
    text, within the same budget."""
    ids: list[str] = []
    labels: list[str | None] = []
    where: list[str] = []
    texts: list[str] = []
    x = None
    if source.kind == "image":
        check_budget(source.total, int(np.prod(shape)), f"{source.total:,} images of {tuple(shape)}")
        x = np.empty((source.total, *shape), np.float32)  # filled in place: no second copy of the dataset
    pos, text_bytes, budget = 0, 0, data_budget()
    for t in source.blocks():
        refuse_bad_rows(t)
        m = t.num_rows
        ids += t.column(ID).to_pylist()
        labels += t.column(LABEL).to_pylist()
        where += t.column(SOURCE).to_pylist()
        if x is not None:
            flat = t.column(X).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            x[pos:pos + m] = as_float(flat.reshape(m, *shape))
        else:
            docs = t.column(TEXT).to_pylist()
            text_bytes += sum(len(d) for d in docs)
            if text_bytes > budget:
                raise InputError(f"{source.spec}: its documents take over {budget / 2**30:.1f} GiB, the budget for "
                                 "training data (RAEFLOW_MAX_DATA_BYTES); train with data.read=stream")
            texts += docs
        pos += m
    if not pos:
        raise InputError(f"{source.spec}: no rows")
    y, classes = class_indices(labels, where, Path(source.spec).name)
    return RawSplit(x[:pos] if x is not None else texts, y, classes, ids)


def class_indices(labels: list[str | None], where: list[str], name: str
                  ) -> tuple[np.ndarray | None, list[str] | None]:
    """Class indices into the sorted distinct labels -- in numeric order when every label is an integer (so
    "2" comes before "10") -- or ``(None, None)`` when no row has one."""
    missing = [w for w, v in zip(where, labels, strict=True) if v is None]
    if len(missing) == len(labels):
        return None, None
    if missing:
        raise InputError(f"{name}: row {missing[0]} has no label, but other rows have one; label every row or none")
    numeric = all(_INT.fullmatch(v) for v in labels)
    classes = sorted(set(labels), key=int) if numeric else sorted(set(labels))
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[v] for v in labels], np.int64), classes


_INT = re.compile(r"-?[0-9]+")
