"""The encoder as a plain callable: load a saved model once, map batches of inputs to embedding rows.

No Ray here. :class:`Encoder` is what ``raeflow embed`` runs inside each actor of its pool (``map_batches`` with
a callable class constructs it once per actor), what ``raeflow search`` uses to encode a query, and what the
tests call directly to check the job's output.

A batch is a ``pyarrow.Table`` or a dict of numpy / pyarrow columns (Ray's batch formats), with:

* ``id`` (strings), optional ``label`` (strings or null), optional ``error`` (null for rows to encode);
* the input: ``x`` for images — an ``(N, C, H, W)`` / ``(N, D)`` array or a ``fixed_size_list`` column, float
  in [0, 1] or uint8 (divided by 255, as the data layer does) — or ``text`` for documents, vectorised with the
  vectoriser saved beside the model.

It returns a ``pyarrow.Table``: ``id``, ``label``, one column per declared capability (:data:`CODE_COLUMNS`:
``embedding`` (``fixed_size_list<float32>[latent]``) for every encoder, ``logvar`` for a Gaussian posterior,
``codes`` (``fixed_size_list<int32>[grid]``) for discrete codes) and ``error``. Rows that arrive with an error
pass through with null embeddings, so a bad input is carried to the errors table instead of being dropped.
:func:`embedding_schema` is the one definition of those columns; the job's Parquet files use it too.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raeflow.artifact import TrainedModel
from raeflow.models import capabilities as cap
from raeflow.errors import InputError
from raeflow.data.rows import (CODES, EMBEDDING, ERROR, ID, LABEL, LOGVAR, SOURCE, TEXT, X,  # noqa: F401 - re-exported
                               to_vectors, vector_type)


#: capability -> the column it adds to the embeddings, in schema order
CODE_COLUMNS: tuple[tuple[str, str], ...] = ((cap.ENCODE, EMBEDDING), (cap.POSTERIOR, LOGVAR),
                                             (cap.DISCRETE_CODES, CODES))


def embedding_schema(latent_dim: int, capabilities: frozenset[str], code_len: int | None = None,
                     error: bool = True, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The columns of the embeddings: ``id``, the capabilities' columns, ``label``, ``source`` (and ``error``
    while rows are in flight; the job splits errors off into their own table before writing)."""
    types = {EMBEDDING: vector_type(latent_dim), LOGVAR: vector_type(latent_dim),
             CODES: pa.list_(pa.int32(), int(code_len or 0))}
    fields = [pa.field(ID, pa.string(), nullable=not metadata)]
    fields += [pa.field(col, types[col]) for c, col in CODE_COLUMNS if c in capabilities]
    fields.append(pa.field(LABEL, pa.string()))
    fields.append(pa.field(SOURCE, pa.string()))
    if error:
        fields.append(pa.field(ERROR, pa.string()))
    return pa.schema(fields, metadata=metadata)


def _column(batch: Any, name: str) -> Any:
    if isinstance(batch, pa.Table):
        return batch.column(name).combine_chunks() if name in batch.column_names else None
    return batch.get(name) if isinstance(batch, Mapping) else None


def _strings(col: Any, n: int) -> pa.Array:
    """A string column (nulls kept); a missing column is all-null."""
    if col is None:
        return pa.nulls(n, pa.string())
    arr = col if isinstance(col, (pa.Array, pa.ChunkedArray)) else pa.array(list(col) if not isinstance(col, np.ndarray)
                                                                            else col.tolist())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr if arr.type == pa.string() else pc.cast(arr, pa.string())


def dense_rows(col: Any, dim: int) -> np.ndarray:
    """``(N, dim)`` float32 in [0, 1] from an array or list column of N rows (no nulls); uint8 is / 255."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values = col.flatten()  # honours slicing offsets
            a = values.to_numpy(zero_copy_only=False)
        else:
            a = np.stack(col.to_numpy(zero_copy_only=False))
    else:
        a = np.asarray(col)
        if a.dtype == object:
            a = np.stack([np.asarray(v) for v in a])
    if a.size != len(col) * dim:
        raise InputError(f"expected {dim} values per row, got {a.size} for {len(col)} rows")
    out = a.reshape(len(col), dim)
    if out.dtype == np.uint8:
        return out.astype(np.float32) / np.float32(255.0)  # the data layer's bytes / 255
    return np.ascontiguousarray(out, dtype=np.float32)


class Encoder:
    """A trained model mapping batches to embeddings (see the module docstring for the columns).

    ``model``: a :class:`~raeflow.artifact.TrainedModel` or a path to one; ``device``: ``"cpu"``, ``"cuda"``...;
    ``threads``: torch intra-op threads for CPU (None: leave torch's default), set here because every Ray actor
    is a fresh process; ``chunk``: rows per forward pass, bounding activation memory when Ray hands over a large
    batch.
    """

    def __init__(self, model: "str | os.PathLike | TrainedModel", device: str = "cpu", threads: int | None = None,
                 chunk: int = 4096):
        if threads:
            torch.set_num_threads(int(threads))
        self.artifact = TrainedModel.load(model, device)
        self.model = self.artifact.model
        self.device = self.artifact.device
        self.capabilities = self.artifact.capabilities
        if cap.ENCODE not in self.capabilities:
            raise InputError(f"a {self.artifact.variant} model has no encoder (capabilities "
                             f"{sorted(self.capabilities)}): there is nothing to embed with it")
        self.input_shape: tuple[int, ...] = self.artifact.input.shape
        self.kind: str = self.artifact.input.kind
        self.latent_dim = self.artifact.latent_dim
        self.code_len: int | None = None
        if cap.DISCRETE_CODES in self.capabilities:  # the code grid's size, measured rather than configured
            with torch.no_grad():
                probe = self.model.encode_indices(torch.zeros(1, *self.input_shape, device=self.device))
            self.code_len = int(probe[0].numel())
        self.chunk = int(chunk)
        self.vectoriser = self.artifact.vectoriser

    # ------------------------------------------------------------------------------------------ numpy API
    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def has_logvar(self) -> bool:
        return cap.POSTERIOR in self.capabilities

    def schema(self) -> pa.Schema:
        """Output columns (the job's error column is split off before writing)."""
        return embedding_schema(self.latent_dim, self.capabilities, self.code_len)

    @torch.no_grad()
    def encode_array(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, *input_shape)`` or ``(N, D)`` float32 -> ``(mu, logvar)``, each ``(N, latent)`` (logvar None
        unless the model declares a posterior). The code is the posterior mean for probabilistic encoders."""
        cols = self.encode_columns(x)
        return cols[EMBEDDING], cols.get(LOGVAR)

    @torch.no_grad()
    def encode_columns(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``(N, *input_shape)`` float32 -> every code column the model's capabilities give, each ``(N, ...)``."""
        x = np.asarray(x, np.float32)
        if x.ndim == 0 or x.size != len(x) * self.input_dim:
            raise InputError(f"expected inputs of shape {self.input_shape} ({self.input_dim} values per row), "
                             f"got an array of shape {x.shape}")
        n = len(x)
        out = {EMBEDDING: np.empty((n, self.latent_dim), np.float32)}
        if self.has_logvar:
            out[LOGVAR] = np.empty((n, self.latent_dim), np.float32)
        if self.code_len is not None:
            out[CODES] = np.empty((n, self.code_len), np.int32)
        for s in range(0, n, self.chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[s:s + self.chunk])).reshape(-1, *self.input_shape)
            xb = xb.to(self.device, non_blocking=True)
            rows = slice(s, s + len(xb))
            if self.has_logvar:
                m, lv = self.model.encode_stats(xb)  # (B, latent) each
                out[LOGVAR][rows] = lv.float().cpu().numpy()
            else:
                m = self.model.encode(xb)  # (B, latent)
            out[EMBEDDING][rows] = m.float().cpu().numpy()
            if self.code_len is not None:
                out[CODES][rows] = self.model.encode_indices(xb).reshape(len(xb), -1).cpu().numpy()
        return out

    def vectorise(self, docs: Sequence[str]) -> np.ndarray:
        if self.vectoriser is None:
            raise InputError(f"this is an {self.kind} model (input shape {list(self.input_shape)}): it does not "
                             "take text")
        return self.vectoriser.transform(list(docs))

    def encode_texts(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode_array(self.vectorise(docs))

    # ------------------------------------------------------------------------------------------ batch API
    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        ids = _strings(_column(batch, ID), _num_rows(batch))
        n = len(ids)
        labels = _strings(_column(batch, LABEL), n)
        sources = _strings(_column(batch, SOURCE), n)
        errors = _strings(_column(batch, ERROR), n)
        ok = np.asarray(errors.is_null().to_numpy(zero_copy_only=False), bool)
        good = np.flatnonzero(ok)
        schema = self.schema()
        cols: dict[str, Any] = {ID: ids}
        encoded = self._encode_rows(batch, good, n) if len(good) else {}
        for name in schema.names:
            if name in (ID, LABEL, SOURCE, ERROR):
                continue
            width = schema.field(name).type.list_size
            full = np.zeros((n, width), np.int32 if name == CODES else np.float32)
            if name in encoded:
                full[good] = encoded[name]
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), width,
                                                           mask=pa.array(~ok, pa.bool_()))
        cols[LABEL] = labels
        cols[SOURCE] = sources
        cols[ERROR] = errors
        return pa.table(cols, schema=schema)

    def _encode_rows(self, batch: Any, rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
        take = None if len(rows) == n else pa.array(rows)
        if self.kind == "text":
            col = _column(batch, TEXT)
            if col is None:
                raise InputError("this document model needs a 'text' column in the batch")
            docs = _strings(col, n)
            docs = docs if take is None else docs.take(take)
            return self.encode_columns(self.vectorise(docs.to_pylist()))
        col = _column(batch, X)
        if col is None:
            raise InputError("this image model needs an 'x' column (the decoded image) in the batch")
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            x = dense_rows(col if take is None else col.take(take), self.input_dim)
        else:
            a = np.asarray(col)
            a = a if take is None else a[rows]
            x = dense_rows(a.reshape(len(a), -1) if a.dtype != object else a, self.input_dim)
        return self.encode_columns(x)


def _num_rows(batch: Any) -> int:
    if isinstance(batch, pa.Table):
        return batch.num_rows
    col = _column(batch, ID)
    if col is None:
        raise InputError("a batch needs an 'id' column")
    return len(col)
