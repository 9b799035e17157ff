"""``raeflow index``: build (or extend) an ANN index beside a ``raeflow embed`` output, streaming its Parquet.

Layout, inside the embeddings directory (``_`` so Parquet readers and ``raeflow embed`` skip it)::

    _index/index.json    kind, parameters, dim, rows, model sha256, and the part files it holds (name, rows, bytes)
    _index/index.faiss   the faiss index; row r of the index is row r of the part files read in name order
    _index/vectors.f32   (ivfpq only) the unit-normalised float32 codes, memory-mapped for exact re-ranking

Kinds (``KINDS``; one class each, nothing else branches on a kind's name):

* ``hnsw`` — faiss ``IndexHNSWFlat`` over unit vectors with inner product (= cosine). The graph holds every
  vector in memory: fastest per query, no training, and ``add`` extends it.
* ``ivfpq`` — faiss ``IndexIVFPQ``: a coarse k-means of ``nlist`` cells (trained on a sample), each vector kept as
  a product-quantised code of ``m`` bytes (15 for 30-d codes: 8x smaller than float32). A query scans ``nprobe``
  cells for a shortlist of ``rerank * k`` candidates, then re-ranks them exactly against ``vectors.f32`` — read
  from disk through the page cache, so the memory the index needs is the codes, not the vectors. Neither the
  build nor the queries hold all vectors in memory; ``add`` encodes new rows with the trained quantisers.

Both are filled chunk by chunk (``CHUNK_ROWS`` rows read from Parquet at a time). No Ray, no torch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import pyarrow.parquet as pq
from raeflow.errors import InputError

INDEX_DIR = "_index"
INFO = "index.json"
FAISS_FILE = "index.faiss"
VECTORS = "vectors.f32"
FORMAT = 1
#: Rows read from Parquet, normalised and added at once: 64k x 30 floats is 8 MB, small beside any index.
CHUNK_ROWS = 1 << 16


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError("raeflow index needs faiss: pip install faiss-cpu") from None
    return faiss


# ------------------------------------------------------------------------------------------- kinds
@dataclass
class IndexKind:
    """One kind of index: its build parameters (recorded in index.json) and how to make, train and query it."""

    name: ClassVar[str]
    needs_training: ClassVar[bool] = False
    keeps_vectors: ClassVar[bool] = False  # writes vectors.f32 for exact re-ranking

    def create(self, dim: int, rows: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_rows(self, rows: int) -> int:
        return 0

    def configure(self, index: Any) -> None:
        """Set the query-time parameters on a loaded index."""

    def shortlist(self, k: int) -> int:
        """Candidates to ask faiss for, before any re-ranking."""
        return k


@dataclass
class HNSW(IndexKind):
    name: ClassVar[str] = "hnsw"
    M: int = 16  # links per node: 16 keeps the graph at ~128 B/row, a third of it for 30-d codes' 120 B
    ef_construction: int = 40  # faiss's default: build time grows linearly with it, recall saturates early
    ef_search: int = 64  # candidates kept per query; tuned in BENCHMARKS.md for recall@10 >= 0.95

    def create(self, dim: int, rows: int) -> Any:
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(dim, self.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def configure(self, index: Any) -> None:
        index.hnsw.efSearch = self.ef_search


@dataclass
class IVFPQ(IndexKind):
    name: ClassVar[str] = "ivfpq"
    needs_training: ClassVar[bool] = True
    keeps_vectors: ClassVar[bool] = True
    nlist: int = 0  # 0: the power of two nearest sqrt(rows) (1M -> 1024 cells, 10M -> 4096)
    m: int = 0  # 0: sub-quantisers of 2 dims each (d/2 bytes per row); must divide the code size
    nbits: int = 8
    nprobe: int = 8  # cells scanned per query: at 1M, 8 of 1024 cells already hold the neighbours (BENCHMARKS.md)
    rerank: int = 30  # shortlist = rerank * k candidates, re-ranked exactly: 10*k left recall@10 at 0.92 at 1M
    #                   (the 16-byte PQ ranking misorders close neighbours), 30*k reaches 0.98
    train_per_cell: int = 64  # k-means sample = train_per_cell * nlist rows (faiss warns below 39)

    def cells(self, rows: int) -> int:
        return self.nlist or max(1, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))

    def subquantizers(self, dim: int) -> int:
        if self.m:
            if dim % self.m:
                raise InputError(f"--kind ivfpq: m={self.m} must divide the code size {dim}")
            return self.m
        return max(d for d in range(1, max(1, dim // 2) + 1) if dim % d == 0)

    def training_rows(self, rows: int) -> int:
        return min(rows, max(256 * 39, self.train_per_cell * self.cells(rows)))

    def create(self, dim: int, rows: int) -> Any:
        faiss = _faiss()
        self.nlist, self.m = self.cells(rows), self.subquantizers(dim)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, self.nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index owns its quantiser now (freed with it)
        return index

    def configure(self, index: Any) -> None:
        index.nprobe = self.nprobe

    def shortlist(self, k: int) -> int:
        return self.rerank * k


KINDS: dict[str, type[IndexKind]] = {cls.name: cls for cls in (HNSW, IVFPQ)}


def make_kind(name: str, params: dict[str, Any] | None = None) -> IndexKind:
    if name not in KINDS:
        raise InputError(f"--kind {name!r}: known kinds are {', '.join(KINDS)}")
    cls = KINDS[name]
    known = {f for f in cls.__dataclass_fields__}
    unknown = set(params or {}) - known
    if unknown:
        raise InputError(f"--kind {name}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(known)}")
    return cls(**(params or {}))


# ------------------------------------------------------------------------------------- reading codes
def part_records(out: Path) -> list[dict[str, Any]]:
    from raeflow.embed.output import part_files

    return [{"file": f.name, "rows": pq.ParquetFile(f).metadata.num_rows, "bytes": f.stat().st_size}
            for f in part_files(out)]


def iter_vectors(out: Path, files: list[str], chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Unit-normalised ``(<= chunk_rows, d)`` float32 chunks of the embeddings in ``files``, in order."""
    from raeflow.embed.encoder import EMBEDDING
    from raeflow.embed.vectors import normalise

    for name in files:
        pf = pq.ParquetFile(out / name)
        for rb in pf.iter_batches(batch_size=chunk_rows, columns=[EMBEDDING], use_threads=False):
            col = rb.column(0)
            yield normalise(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))


def sample_vectors(out: Path, files: list[str], rows: int, want: int, seed: int = 0) -> np.ndarray:
    """``want`` rows drawn uniformly without replacement from ``rows`` rows, in one streaming pass that keeps
    only the sample (the positions are drawn first: 8 bytes per sampled row)."""
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(want, rows), replace=False))
    keep, start = [], 0
    for v in iter_vectors(out, files):
        lo, hi = np.searchsorted(pick, [start, start + len(v)])
        keep.append(v[pick[lo:hi] - start])
        start += len(v)
    return np.ascontiguousarray(np.concatenate(keep))


# ------------------------------------------------------------------------------------------- build
@dataclass
class BuildSummary:
    kind: str
    rows: int  # rows in the index now
    added: int  # rows this call added
    seconds: float
    index_bytes: int  # index.faiss (+ vectors.f32 for kinds that re-rank)
    memory_bytes: int  # what a query process holds in memory: index.faiss (vectors.f32 is memory-mapped)
    incremental: bool
    params: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int | None = None  # this process's high-water mark (Linux VmHWM), imports included

    def lines(self) -> list[str]:
        how = f"added {self.added:,} rows to" if self.incremental else f"built from {self.added:,} rows:"
        peak = f"; peak RSS of this process {self.peak_rss_bytes / 2**20:,.0f} MiB" if self.peak_rss_bytes else ""
        return [f"index: {how} {self.kind} ({self.rows:,} rows) in {self.seconds:.1f}s; "
                f"{self.index_bytes / 2**20:,.1f} MiB on disk, {self.memory_bytes / 2**20:,.1f} MiB in memory{peak}",
                "params: " + ", ".join(f"{k}={v}" for k, v in self.params.items())]


def peak_rss() -> int | None:
    """This process's peak resident memory (``VmHWM``; reset by exec, unlike a child's ``ru_maxrss``, which can
    report the forking parent's size), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def index_dir(embeddings: str | os.PathLike) -> Path:
    return Path(embeddings) / INDEX_DIR


def read_info(embeddings: str | os.PathLike) -> dict[str, Any] | None:
    p = index_dir(embeddings) / INFO
    return json.loads(p.read_text()) if p.is_file() else None


def build_index(embeddings: str | os.PathLike, kind: str | None = None, params: dict[str, Any] | None = None, *,
                rebuild: bool = False, threads: int | None = 1, seed: int = 0,
                log: Callable[[str], None] = print) -> BuildSummary:
    """Build ``_index/`` for ``embeddings``, or — when one exists and ``kind``/``params`` do not change it — add
    the part files committed since (``raeflow embed --resume``). ``rebuild`` starts over."""
    from raeflow.embed.output import read_metadata

    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    out = Path(embeddings)
    meta = read_metadata(out)  # raises FileNotFoundError for a directory without part files
    sha = meta.get("raeflow.model_sha256")
    parts = part_records(out)
    info = None if rebuild else read_info(out)
    if info is not None and (kind not in (None, info["kind"]) or (params and params != _own_params(info))):
        raise InputError(f"{index_dir(out)} holds a {info['kind']} index with {_own_params(info)}; pass --rebuild "
                         "to replace it with another kind or other parameters")
    if info is not None:
        return _extend(out, info, parts, sha, log)
    return _build(out, make_kind(kind or "hnsw", params), parts, meta, sha, seed, log)


def _own_params(info: dict[str, Any]) -> dict[str, Any]:
    return dict(info["params"])


def _dim(out: Path, parts: list[dict[str, Any]]) -> int:
    from raeflow.embed.encoder import EMBEDDING

    return int(pq.read_schema(out / parts[0]["file"]).field(EMBEDDING).type.list_size)


def _build(out: Path, kind: IndexKind, parts: list[dict[str, Any]], meta: dict[str, str], sha: str | None,
           seed: int, log: Callable[[str], None]) -> BuildSummary:
    faiss = _faiss()
    t0 = time.perf_counter()
    files = [p["file"] for p in parts]
    rows, dim = sum(p["rows"] for p in parts), _dim(out, parts)
    if rows == 0:
        raise InputError(f"{out}: the embeddings hold no rows")
    index = kind.create(dim, rows)
    tmp = out / f".{INDEX_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if kind.needs_training:
        sample = sample_vectors(out, files, rows, kind.training_rows(rows), seed)
        log(f"index: training {kind.name} on {len(sample):,} of {rows:,} rows")
        index.train(sample)
        del sample
    added = _fill(index, kind, out, files, tmp, log)
    info = {"format": FORMAT, "kind": kind.name, "params": asdict(kind), "library": "faiss",
            "library_version": faiss.__version__, "metric": "cosine", "dim": dim, "rows": added,
            "model_sha256": sha, "embeddings_input": meta.get("raeflow.input"), "parts": parts,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _commit(index, info, tmp)
    final = index_dir(out)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return _summary(out, info, added, time.perf_counter() - t0, incremental=False, log=log)


def _fill(index: Any, kind: IndexKind, out: Path, files: list[str], where: Path, log: Callable[[str], None]) -> int:
    """Add the rows of ``files`` chunk by chunk (and append them to vectors.f32 for re-ranking kinds)."""
    added = 0
    vec_file = open(where / VECTORS, "ab") if kind.keeps_vectors else None
    try:
        for chunk in iter_vectors(out, files):
            index.add(chunk)
            if vec_file is not None:
                vec_file.write(chunk.tobytes())
            added += len(chunk)
        if vec_file is not None:
            vec_file.flush()
            os.fsync(vec_file.fileno())
    finally:
        if vec_file is not None:
            vec_file.close()
    return added


def _commit(index: Any, info: dict[str, Any], where: Path) -> None:
    """index.faiss then index.json, each under a temporary name first: index.json names the rows that count."""
    faiss = _faiss()
    tmp = where / f".{FAISS_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, where / FAISS_FILE)
    tmp = where / f".{INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, where / INFO)


def _extend(out: Path, info: dict[str, Any], parts: list[dict[str, Any]], sha: str | None,
            log: Callable[[str], None]) -> BuildSummary:
    """Add the part files written after the index was built; refuse when the old ones changed."""
    faiss = _faiss()
    t0 = time.perf_counter()
    check_model(out, info, sha)
    new = check_parts(out, info, parts)
    kind = make_kind(info["kind"], info["params"])
    where = index_dir(out)
    if not new:
        log(f"index: {where} is up to date ({info['rows']:,} rows)")
        return _summary(out, info, 0, time.perf_counter() - t0, incremental=True, log=log)
    index = faiss.read_index(str(where / FAISS_FILE))
    if kind.keeps_vectors:  # drop rows an interrupted extension appended but never recorded
        with open(where / VECTORS, "r+b") as f:
            f.truncate(info["rows"] * info["dim"] * 4)
    added = _fill(index, kind, out, [p["file"] for p in new], where, log)
    info = {**info, "rows": info["rows"] + added, "parts": info["parts"] + new,
            "extended": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _commit(index, info, where)
    return _summary(out, info, added, time.perf_counter() - t0, incremental=True, log=log)


def _summary(out: Path, info: dict[str, Any], added: int, seconds: float, *, incremental: bool,
             log: Callable[[str], None]) -> BuildSummary:
    where = index_dir(out)
    mem = (where / FAISS_FILE).stat().st_size
    vec = (where / VECTORS).stat().st_size if (where / VECTORS).exists() else 0
    s = BuildSummary(info["kind"], info["rows"], added, seconds, mem + vec, mem, incremental, info["params"],
                     peak_rss())
    for line in s.lines():
        log(line)
    return s


class IndexMismatch(ValueError):
    """The index in an embeddings directory cannot answer for these embeddings or this model."""


def check_model(out: Path, info: dict[str, Any], embeddings_sha: str | None, model_sha: str | None = None) -> None:
    built = info.get("model_sha256")
    if built != embeddings_sha:
        raise IndexMismatch(f"{index_dir(out)} was built from embeddings of model sha256 {str(built)[:12]}, but the "
                            f"embeddings in {out} are model {str(embeddings_sha)[:12]}'s: it is another model's "
                            f"index; rebuild it with `raeflow index --embeddings {out} --rebuild`")
    if model_sha is not None and built is not None and model_sha != built:
        raise IndexMismatch(f"{index_dir(out)} indexes codes of model sha256 {built[:12]}, but the query model is "
                            f"{model_sha[:12]}: codes of different models are not comparable")


def check_parts(out: Path, info: dict[str, Any], parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The part files the index does not hold yet (to add); raises if any file it holds changed or went away."""
    now = {p["file"]: p for p in parts}
    for p in info["parts"]:
        q = now.get(p["file"])
        if q is None or (q["rows"], q["bytes"]) != (p["rows"], p["bytes"]):
            what = "is gone" if q is None else f"changed ({p['rows']:,} rows, {p['bytes']:,} bytes when indexed)"
            raise IndexMismatch(f"{out / p['file']} {what}: the index no longer matches the embeddings; rebuild it "
                                f"with `raeflow index --embeddings {out} --rebuild`")
    held = {p["file"] for p in info["parts"]}
    last = max(held)
    new = [p for p in parts if p["file"] not in held]
    early = [p["file"] for p in new if p["file"] < last]
    if early:  # rows are numbered by file order: a file sorting before indexed ones would shift them
        raise IndexMismatch(f"{out}: {', '.join(early)} sort before files already indexed; rebuild with --rebuild")
    return new
