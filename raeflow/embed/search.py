"""Exact cosine nearest neighbours over an embeddings directory (``raeflow search``; Serve's ``/search``).

:class:`Index` holds the unit-normalised embeddings in memory as one float32 matrix and answers a batch of
queries with one matrix product per chunk of queries plus ``argpartition`` for the top k — exact, and at
30-d codes a million rows take 120 MB and a few milliseconds per query on one core. (scikit-learn's
``NearestNeighbors(metric="cosine", algorithm="brute")`` computes the same thing through the same kind of
product, with more copies.) No Ray here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.dataset as pads

from raeflow.artifact import TrainedModel
from raeflow.embed.encoder import EMBEDDING, ID, LABEL
from raeflow.embed.vectors import MAX_BLOCK, Hit, normalise, top_k, unit_queries  # noqa: F401 - re-exported
from raeflow.errors import InputError, MissingFileError


class Index:
    """Embeddings in memory for exact cosine search. ``Index.load(OUT_DIR)`` reads a ``raeflow embed`` output
    (its ``part-*.parquet`` files; errors are not rows); ``search(vectors, k)`` returns, per query, the k
    nearest rows as :class:`Hit` (id, cosine score, label), best first."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, labels: Sequence[str | None] | None = None,
                 metadata: dict[str, str] | None = None):
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise InputError(f"expected {len(ids)} vectors as an (N, d) array, got shape {vectors.shape}")
        if len(ids) == 0:
            raise InputError("an index needs at least one embedding")
        self.ids = list(ids)
        self.labels = list(labels) if labels is not None else [None] * len(self.ids)
        self.vectors = normalise(vectors)
        self.metadata = dict(metadata or {})

    @classmethod
    def load(cls, embeddings: str | os.PathLike) -> "Index":
        from raeflow.embed.output import part_files, read_metadata

        files = part_files(Path(embeddings))
        if not files:
            raise MissingFileError(f"{embeddings}: no part-*.parquet files (make them with `raeflow embed`)")
        table = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=[ID, EMBEDDING, LABEL])
        emb = table.column(EMBEDDING).combine_chunks()
        dim = emb.type.list_size
        vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        return cls(table.column(ID).to_pylist(), vectors, table.column(LABEL).to_pylist(), read_metadata(embeddings))

    def describe(self) -> str:
        """How this index answers (the ANN indexes say their kind and settings)."""
        return "exact"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def model_sha256(self) -> str | None:
        return self.metadata.get("raeflow.model_sha256")

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        idx, score = top_k(unit_queries(vectors, self.dim, k), self.vectors, k)
        return [[Hit(self.ids[j], float(s), self.labels[j]) for j, s in zip(row_i, row_s)]
                for row_i, row_s in zip(idx, score)]


# ------------------------------------------------------------------------------------------ queries
def encode_query(encoder, query: str) -> tuple[np.ndarray, str]:
    """One query -> ``((1, latent) code, what it was)``: an image or ``.txt`` file path, a built-in dataset row
    ``name:split:index`` (e.g. ``mnist:test:17``), or — for document models — the text itself."""
    from raeflow.data.catalog import known_datasets

    p = Path(query)
    if encoder.kind == "image":
        if p.is_file():
            from raeflow.data.decode import decode_image

            x = decode_image(p.read_bytes(), tuple(encoder.input_shape[1:]), encoder.artifact.input.mode, str(p))
            return encoder.encode_array(x[None])[0], f"image {p}"
        row = _builtin_row(query, known_datasets())
        if row is not None:
            x, what = row
            return encoder.encode_array(np.asarray(x, np.float32)[None])[0], what
        raise MissingFileError(f"--query {query!r}: for an image model give an image file or a built-in row such "
                                "as mnist:test:17")
    if p.suffix.lower() == ".txt" and p.is_file():
        from raeflow.data.text import read_text_file

        return encoder.encode_texts([read_text_file(p)])[0], f"document {p}"
    row = _builtin_row(query, known_datasets())
    if row is not None:
        text, what = row
        return encoder.encode_texts([text])[0], what
    from raeflow.data.text import check_document

    shown = query if len(query) <= 60 else query[:57] + "..."
    return encoder.encode_texts([check_document(query, "--query")])[0], f"text {shown!r}"


def _builtin_row(query: str, datasets: dict) -> tuple[Any, str] | None:
    from raeflow.data.catalog import builtin_split, parse_spec

    head, _, index = query.rpartition(":")
    name, split = parse_spec(head)
    if split is None or name not in datasets or not index.isdigit():
        return None
    i = int(index)
    try:
        raw = builtin_split(name, split).load(split)
    except InputError as e:
        raise InputError(f"--query {query}: {e}") from None
    if i >= len(raw.x):
        raise InputError(f"--query {query}: {name}:{split} has {len(raw.x)} rows")
    label = None if raw.y is None or raw.classes is None else raw.classes[int(raw.y[i])]
    return raw.x[i], f"{query} (label {label})"


def search(embeddings: str | os.PathLike, model: "str | os.PathLike | TrainedModel", query: str, k: int = 10,
           exact: bool = False) -> dict[str, Any]:
    """``raeflow search``: encode ``query`` with ``model`` and return the ``k`` nearest embeddings — through the
    directory's ANN index when ``raeflow index`` built one, exactly when ``exact`` or there is none."""
    from raeflow.embed.encoder import Encoder
    from raeflow.index import open_index

    art = TrainedModel.load(model)
    sha = art.sha256
    index = None if exact else open_index(embeddings, sha)  # None -> the exact search below
    index = index or Index.load(embeddings)
    if index.model_sha256 and index.model_sha256 != sha:
        raise InputError(f"{embeddings} was embedded by model sha256 {index.model_sha256[:12]}, but --model is "
                         f"{sha[:12]}: codes of different models are not comparable; embed with this model first")
    encoder = Encoder(art)
    code, what = encode_query(encoder, query)
    hits = index.search(code, k)[0]
    return {"query": what, "k": k, "rows": len(index), "model_sha256": sha,
            "search": index.describe(),
            "hits": [h.to_dict() for h in hits]}


def format_hits(result: dict[str, Any]) -> str:
    lines = [f"query: {result['query']}  ({result['rows']:,} rows searched, cosine similarity, "
             f"{result.get('search', 'exact')})",
             f"{'rank':>4}  {'score':>7}  {'label':<24} id"]
    for r, h in enumerate(result["hits"], start=1):
        lines.append(f"{r:>4}  {h['score']:>7.4f}  {str(h['label'] if h['label'] is not None else '-'):<24} {h['id']}")
    return "\n".join(lines)
