"""The columns every row of data carries between raeflow's readers, its encoder and its outputs.

One vocabulary for the input layer (:mod:`raeflow.data.readers` / :mod:`raeflow.data.sources`, which train and
embed both read through) and for the embeddings it leads to. Plain pyarrow and numpy.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

#: Column names.
ID, LABEL, ERROR, X, TEXT, EMBEDDING, LOGVAR, CODES = "id", "label", "error", "x", "text", "embedding", "logvar", "codes"
#: The row's position in its input: the id it would have had without an id column (``file#row`` for Parquet, the
#: document index for JSONL, the relative path in a folder, ``dataset:split:index``). Unlike a user's id it is
#: unique by construction, so ``--resume`` skips rows by it: a repeated user id can never hide an unread row.
SOURCE = "source"


def vector_type(dim: int) -> pa.DataType:
    """``fixed_size_list<float32>[dim]``: Arrow's own type, readable by any Parquet reader (no Ray extension)."""
    return pa.list_(pa.float32(), dim)


def to_vectors(a: np.ndarray, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """``(N, k)`` float32 -> a ``fixed_size_list`` array; ``mask`` True marks null rows (their values unused)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    n, k = a.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), k,
                                             mask=None if mask is None else pa.array(mask, pa.bool_()))
