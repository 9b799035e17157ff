"""Cosine similarity over unit vectors, in bounded blocks: the exact search every index is checked against.

Plain numpy, no imports from the rest of raeflow, so the exact search (``raeflow.embed.search``) and the ANN
indexes (``raeflow.index``) both build on it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Similarity-matrix elements computed at once (queries x rows): bounds search memory to ~256 MB of float32.
MAX_BLOCK = 1 << 26


def normalise(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is then 0)."""
    v = np.asarray(v, np.float32)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def top_k(q: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows ``q`` (m, d) and ``base`` (n, d): the indices and cosine scores of the ``k`` most similar
    base rows per query, best first. ``exclude[i]`` (optional) is a base row never returned for query i (the
    query itself in leave-one-out evaluation)."""
    m, n = len(q), len(base)
    k = min(k, n - (exclude is not None))
    idx = np.empty((m, k), np.int64)
    score = np.empty((m, k), np.float32)
    step = max(1, MAX_BLOCK // max(n, 1))
    for s in range(0, m, step):
        sims = q[s:s + step] @ base.T
        if exclude is not None:
            sims[np.arange(len(sims)), exclude[s:s + step]] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sims), 1))
        ps = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[s:s + step] = np.take_along_axis(part, order, axis=1)
        score[s:s + step] = np.take_along_axis(ps, order, axis=1)
    return idx, score


@dataclass
class Hit:
    id: str
    score: float
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "label": self.label}


def unit_queries(vectors: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Query vectors (d,) or (m, d) -> (m, d) unit rows, after checking their size and ``k``: the one rule the exact
    search and every ANN index apply to a query."""
    from raeflow.errors import InputError

    q = np.asarray(vectors, np.float32)
    q = q[None] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise InputError(f"query vectors must have {dim} values (the embeddings' size), got shape "
                         f"{np.shape(vectors)}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    return normalise(q)
