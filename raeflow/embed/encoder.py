"""The encoder as a plain callable: load a saved model once, map batches of inputs to embedding rows.

No Ray here. :class:`Encoder` is what ``raeflow embed`` runs inside each actor of its pool (``map_batches`` with
a callable class constructs it once per actor), what ``raeflow search`` uses to encode a query, and what the
tests call directly to check the job's output.

A batch is a ``pyarrow.Table`` or a dict of numpy / pyarrow columns (Ray's batch formats), with:

* ``id`` (strings), optional ``label`` (strings or null), optional ``error`` (null for rows to encode);
* the input: ``x`` for images — an ``(N, C, H, W)`` / ``(N, D)`` array or a ``fixed_size_list`` column, float
  in [0, 1] or uint8 (divided by 255, as the data layer does) — or ``text`` for documents, vectorised with the
  vectoriser saved beside the model.

It returns a ``pyarrow.Table``: ``id``, ``embedding`` (``fixed_size_list<float32>[latent]``), ``label``,
``logvar`` for models with ``encode_stats`` (VAE), and ``error``. Rows that arrive with an error pass through
with null embeddings, so a bad input is carried to the errors table instead of being dropped.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raeflow.io import load_model, model_dir, read_config, read_vectoriser

#: Batch columns this module reads and writes.
ID, LABEL, ERROR, X, TEXT, EMBEDDING, LOGVAR = "id", "label", "error", "x", "text", "embedding", "logvar"


def vector_type(dim: int) -> pa.DataType:
    """``fixed_size_list<float32>[dim]``: Arrow's own type, readable by any Parquet reader (no Ray extension)."""
    return pa.list_(pa.float32(), dim)


def to_vectors(a: np.ndarray, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """``(N, k)`` float32 -> a ``fixed_size_list`` array; ``mask`` True marks null rows (their values unused)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    n, k = a.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), k,
                                             mask=None if mask is None else pa.array(mask, pa.bool_()))


def image_mode(input_shape: Sequence[int]) -> str:
    """The Pillow mode a model's images must be converted to: its channel count decides."""
    c = int(input_shape[0])
    if c not in (1, 3):
        raise ValueError(f"image models take 1 or 3 channels; this one takes input_shape {list(input_shape)}")
    return "L" if c == 1 else "RGB"


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
        raise ValueError(f"expected {dim} values per row, got {a.size} for {len(col)} rows")
    out = a.reshape(len(col), dim)
    if out.dtype == np.uint8:
        return out.astype(np.float32) / np.float32(255.0)  # the data layer's bytes / 255
    return np.ascontiguousarray(out, dtype=np.float32)


class Encoder:
    """A saved model, loaded once, mapping batches to embeddings (see the module docstring for the columns).

    ``device``: ``"cpu"``, ``"cuda"``...; ``threads``: torch intra-op threads for CPU (None: leave torch's
    default), set here because every Ray actor is a fresh process; ``chunk``: rows per forward pass, bounding
    activation memory when Ray hands over a large batch.
    """

    def __init__(self, model: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 chunk: int = 4096):
        if threads:
            torch.set_num_threads(int(threads))
        self.model_dir = model_dir(model)
        self.config = read_config(self.model_dir)
        self.device = torch.device(device)
        self.model = load_model(self.model_dir, device=self.device)
        self.variant: str = self.config["variant"]
        data = self.config.get("data") or {}
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in (data.get("input_shape") or self.model.input_shape))
        self.kind: str = data.get("kind") or ("text" if len(self.input_shape) == 1 else "image")
        self.latent_dim = int(self.model.latent_dim)
        self.has_logvar = callable(getattr(self.model, "encode_stats", None))
        self.chunk = int(chunk)
        self.vectoriser = None
        if self.kind == "text":
            from raeflow.data.text import Vectoriser

            saved = read_vectoriser(self.model_dir)
            if saved is None:
                raise FileNotFoundError(f"{self.model_dir} is a document model but has no vectoriser.json (it is "
                                        "saved at training time); cannot turn text into the model's input")
            self.vectoriser = Vectoriser.from_json(saved)

    # ------------------------------------------------------------------------------------------ numpy API
    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    def schema(self) -> pa.Schema:
        """Output columns (the job's error column is split off before writing)."""
        fields = [pa.field(ID, pa.string()), pa.field(EMBEDDING, vector_type(self.latent_dim)),
                  pa.field(LABEL, pa.string())]
        if self.has_logvar:
            fields.append(pa.field(LOGVAR, vector_type(self.latent_dim)))
        return pa.schema(fields + [pa.field(ERROR, pa.string())])

    @torch.no_grad()
    def encode_array(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, *input_shape)`` or ``(N, D)`` float32 -> ``(mu, logvar)``, each ``(N, latent)`` (logvar None
        unless the model has ``encode_stats``). The code is the posterior mean for probabilistic encoders."""
        x = np.asarray(x, np.float32)
        if x.ndim == 0 or x.size != len(x) * self.input_dim:
            raise ValueError(f"expected inputs of shape {self.input_shape} ({self.input_dim} values per row), "
                             f"got an array of shape {x.shape}")
        n = len(x)
        mu = np.empty((n, self.latent_dim), np.float32)
        logvar = np.empty((n, self.latent_dim), np.float32) if self.has_logvar else None
        for s in range(0, n, self.chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[s:s + self.chunk])).reshape(-1, *self.input_shape)
            xb = xb.to(self.device, non_blocking=True)
            if self.has_logvar:
                m, lv = self.model.encode_stats(xb)
                logvar[s:s + len(xb)] = lv.float().cpu().numpy()
            else:
                m = self.model.encode(xb)
            mu[s:s + len(xb)] = m.float().cpu().numpy()
        return mu, logvar

    def vectorise(self, docs: Sequence[str]) -> np.ndarray:
        if self.vectoriser is None:
            raise ValueError(f"this is an {self.kind} model (input shape {list(self.input_shape)}): it does not "
                             "take text")
        return self.vectoriser.transform(list(docs))

    def encode_texts(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode_array(self.vectorise(docs))

    # ------------------------------------------------------------------------------------------ batch API
    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        ids = _strings(_column(batch, ID), _num_rows(batch))
        n = len(ids)
        labels = _strings(_column(batch, LABEL), n)
        errors = _strings(_column(batch, ERROR), n)
        ok = np.asarray(errors.is_null().to_numpy(zero_copy_only=False), bool)
        good = np.flatnonzero(ok)
        mu = np.zeros((n, self.latent_dim), np.float32)
        logvar = np.zeros((n, self.latent_dim), np.float32) if self.has_logvar else None
        if len(good):
            m, lv = self._encode_rows(batch, good, n)
            mu[good] = m
            if logvar is not None:
                logvar[good] = lv
        cols = {ID: ids, EMBEDDING: to_vectors(mu, ~ok), LABEL: labels}
        if logvar is not None:
            cols[LOGVAR] = to_vectors(logvar, ~ok)
        cols[ERROR] = errors
        return pa.table(cols, schema=self.schema())

    def _encode_rows(self, batch: Any, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        take = None if len(rows) == n else pa.array(rows)
        if self.kind == "text":
            col = _column(batch, TEXT)
            if col is None:
                raise ValueError("this document model needs a 'text' column in the batch")
            docs = _strings(col, n)
            docs = docs if take is None else docs.take(take)
            return self.encode_texts(docs.to_pylist())
        col = _column(batch, X)
        if col is None:
            raise ValueError("this image model needs an 'x' column (the decoded image) in the batch")
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            x = dense_rows(col if take is None else col.take(take), self.input_dim)
        else:
            a = np.asarray(col)
            a = a if take is None else a[rows]
            x = dense_rows(a.reshape(len(a), -1) if a.dtype != object else a, self.input_dim)
        return self.encode_array(x)


def _num_rows(batch: Any) -> int:
    if isinstance(batch, pa.Table):
        return batch.num_rows
    col = _column(batch, ID)
    if col is None:
        raise ValueError("a batch needs an 'id' column")
    return len(col)
