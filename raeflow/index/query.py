"""Open an embeddings directory's ANN index and answer queries with it (``raeflow search``, Serve's ``/search``).

:func:`open_index` is the one call the search code makes: it returns an :class:`AnnIndex` — the same
``search(vectors, k) -> hits`` interface as the exact :class:`raeflow.embed.search.Index` — or ``None`` when the
directory has no index or is small enough that the exact product is as fast (``EXACT_BELOW`` rows), and it
refuses an index that does not match: built for another model's codes, from part files that have changed since,
or missing part files that a later ``raeflow embed --resume`` added (those are added by running
``raeflow index`` again).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raeflow.index.build import (FAISS_FILE, VECTORS, IndexMismatch, _faiss, check_model,  # noqa: F401
                                 check_parts, index_dir, make_kind, part_records, read_info)
from raeflow.errors import InputError

#: Below this many rows the exact search (one matrix product: ~0.5 ms per query at 50k 30-d rows) is as fast as
#: an index and has no recall to lose, so ``open_index`` leaves such directories to it.
EXACT_BELOW = 50_000




class AnnIndex:
    """A faiss index plus the ids and labels of its rows; ``search`` returns :class:`~raeflow.embed.search.Hit`."""

    def __init__(self, out: Path, info: dict[str, Any], index: Any, ids: pa.Array, labels: pa.Array,
                 vectors: np.ndarray | None):
        self.out, self.info, self.index = out, info, index
        self.ids, self.labels = ids, labels
        self.vectors = vectors  # (rows, d) float32 memory map for re-ranking kinds, else None
        self.kind = make_kind(info["kind"], info["params"])
        self.kind.configure(index)
        self.metadata = {"raeflow.model_sha256": info.get("model_sha256") or ""}

    def __len__(self) -> int:
        return int(self.info["rows"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def model_sha256(self) -> str | None:
        return self.info.get("model_sha256")

    def describe(self) -> str:
        return f"{self.info['kind']} index, " + ", ".join(f"{k}={v}" for k, v in self.info["params"].items())

    def set_params(self, **params: Any) -> None:
        """Change query-time parameters (``ef_search``, ``nprobe``, ``rerank``) for this process."""
        for k, v in params.items():
            if not hasattr(self.kind, k):
                raise InputError(f"{self.info['kind']} index has no parameter {k!r}")
            setattr(self.kind, k, v)
        self.kind.configure(self.index)

    def top_k(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit rows ``q`` (m, d) -> (row indices (m, k) int64, cosine scores (m, k) float32), best first; -1 pads
        a row that found fewer than k."""
        k = min(k, len(self))
        q = np.ascontiguousarray(q, np.float32)
        score, idx = self.index.search(q, min(self.kind.shortlist(k), len(self)))
        if self.vectors is None:
            return idx[:, :k], score[:, :k]
        return self._rerank(q, idx, k)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine over each query's shortlist, read from the memory-mapped vectors."""
        m = len(q)
        idx = np.full((m, k), -1, np.int64)
        score = np.full((m, k), -np.inf, np.float32)
        for i in range(m):
            c = cand[i][cand[i] >= 0]
            if not len(c):
                continue
            c = np.sort(c)  # ascending offsets: sequential-ish reads from the map
            s = self.vectors[c] @ q[i]  # (shortlist,)
            top = np.argsort(-s, kind="stable")[:k]
            idx[i, :len(top)], score[i, :len(top)] = c[top], s[top]
        return idx, score

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Any]]:
        from raeflow.embed.vectors import Hit, unit_queries

        idx, score = self.top_k(unit_queries(vectors, self.dim, k), k)
        return [[Hit(self.ids[int(j)].as_py(), float(s), self.labels[int(j)].as_py())
                 for j, s in zip(row_i, row_s) if j >= 0] for row_i, row_s in zip(idx, score)]


def open_index(embeddings: str | os.PathLike, model_sha256: str | None = None, *,
               min_rows: int | None = None) -> AnnIndex | None:
    """The ANN index of ``embeddings`` (``raeflow index`` built it), or ``None`` when there is none or the set is
    smaller than ``min_rows`` (default ``EXACT_BELOW``): the caller then searches exactly. Raises
    :class:`IndexMismatch` for another model's index or one that no longer covers the embeddings."""
    from raeflow.embed.encoder import ID, LABEL
    from raeflow.embed.output import read_metadata

    out = Path(embeddings)
    info = read_info(out)
    if info is None:
        return None
    check_model(out, info, read_metadata(out).get("raeflow.model_sha256"), model_sha256)
    new = check_parts(out, info, part_records(out))
    if new:
        rows = sum(p["rows"] for p in new)
        raise IndexMismatch(f"{index_dir(out)} covers {info['rows']:,} rows but {len(new)} part file(s) with "
                            f"{rows:,} more were embedded since: run `raeflow index --embeddings {out}` to add "
                            "them, or search with --exact")
    if info["rows"] < (EXACT_BELOW if min_rows is None else min_rows):
        return None
    import pyarrow.parquet as pq

    index = _faiss().read_index(str(index_dir(out) / FAISS_FILE))
    cols = [pq.read_table(out / p["file"], columns=[ID, LABEL]) for p in info["parts"]]
    table = pa.concat_tables(cols)
    vectors = None
    if make_kind(info["kind"], info["params"]).keeps_vectors:
        vectors = np.memmap(index_dir(out) / VECTORS, np.float32, "r", shape=(info["rows"], info["dim"]))
    return AnnIndex(out, info, index, table.column(ID).combine_chunks(), table.column(LABEL).combine_chunks(),
                    vectors)
