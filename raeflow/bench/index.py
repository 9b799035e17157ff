"""``raeflow bench index``: the ANN index against the exact search, side by side, on one embeddings directory.

For each kind: build it with ``raeflow index`` in a child process (wall time, the child's peak RSS, index size),
then — with one thread for faiss and for BLAS — recall@k of the index against the exact search, queries/s one
at a time (as ``/search`` answers a request) and in batches, against the exact ``top_k`` of
:mod:`raeflow.embed.search` over the same unit vectors. Queries are held-out images (MNIST's test split by
default) encoded by the model that made the embeddings, so neither side has seen them.

Timings are wall-clock on whatever else the machine is running: every row carries the 1-minute load average.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _one_thread():
    from threadpoolctl import threadpool_limits

    import faiss

    faiss.omp_set_num_threads(1)
    return threadpool_limits(1)


def load_vectors(embeddings: Path) -> np.ndarray:
    """All unit vectors of ``embeddings`` in part-file order: the exact side's matrix (row r = index row r)."""
    from raeflow.index.build import iter_vectors, part_records

    parts = part_records(embeddings)
    if not parts:
        from raeflow.errors import MissingFileError

        raise MissingFileError(f"{embeddings}: no part-*.parquet files (embed into it first, or pass --corpus)")
    rows = sum(p["rows"] for p in parts)
    out = None
    r = 0
    for chunk in iter_vectors(embeddings, [p["file"] for p in parts]):
        if out is None:
            out = np.empty((rows, chunk.shape[1]), np.float32)
        out[r:r + len(chunk)] = chunk
        r += len(chunk)
    return out


def embed_corpus(corpus: str, model: str, out: str, batch_size: int = 4096,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed a ``raeflow corpus`` Parquet directory in this process, one thread: the same
    :class:`~raeflow.embed.encoder.Encoder` and :class:`~raeflow.embed.job.PartWriter` (so the same part files,
    schema and ``raeflow.*`` metadata) as ``raeflow embed``, without Ray's start-up — for the benchmark's corpora
    on a loaded 2-core machine. Ids are the corpus's ``id`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raeflow.embed.encoder import EMBEDDING, ERROR, ID, LABEL, Encoder, dense_rows, to_vectors
    from raeflow.embed.output import PartWriter, errors_schema, metadata, output_schema, part_files, rows_per_file

    t0 = time.perf_counter()
    enc = Encoder(model, threads=1)
    meta = metadata(enc.artifact, str(Path(corpus).resolve()))
    schema = output_schema(enc, meta)
    writer = PartWriter(Path(out), schema, errors_schema(meta), rows_per_file(schema))
    for f in part_files(Path(corpus)):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["id", "image", "label"]):
            mu, _ = enc.encode_array(dense_rows(rb.column(1), enc.input_dim))
            writer.add(pa.table({ID: rb.column(0), EMBEDDING: to_vectors(mu), LABEL: rb.column(2),
                                 ERROR: pa.nulls(len(mu), pa.string())}))
        log(f"embedded {f.name}: {writer.embedded + writer._n:,} rows so far")
    writer.close()
    return {"rows": writer.embedded, "seconds": round(time.perf_counter() - t0, 1), "load": _load()}


def encode_queries(model: str, source: str, n: int) -> np.ndarray:
    """``n`` rows of the built-in ``source`` (``mnist:test``) encoded by ``model`` and unit-normalised."""
    from raeflow.data.catalog import known_datasets, parse_spec
    from raeflow.embed.encoder import Encoder
    from raeflow.embed.vectors import normalise

    datasets = known_datasets()  # registers the built-ins, which parse_spec needs to see first
    name, split = parse_spec(source)
    x = np.asarray(datasets[name].load(split or "test").x[:n], np.float32)
    enc = Encoder(model, threads=1)
    return normalise(np.concatenate([enc.encode_array(x[s:s + 1000])[0] for s in range(0, len(x), 1000)]))


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def time_single(fn: Callable[[np.ndarray], Any], q: np.ndarray, budget_s: float, at_most: int) -> dict[str, Any]:
    """Queries answered one at a time until ``budget_s`` or ``at_most`` queries: queries/s and p50 latency."""
    lat = []
    t_end = time.perf_counter() + budget_s
    for i in range(min(at_most, len(q))):
        t = time.perf_counter()
        fn(q[i:i + 1])
        lat.append(time.perf_counter() - t)
        if t > t_end:
            break
    lat = np.asarray(lat)
    return {"queries": len(lat), "qps": round(len(lat) / lat.sum(), 1), "p50_ms": round(1e3 * np.median(lat), 3),
            "load": _load()}


def time_batch(fn: Callable[[np.ndarray], Any], q: np.ndarray) -> dict[str, Any]:
    t = time.perf_counter()
    fn(q)
    s = time.perf_counter() - t
    return {"queries": len(q), "qps": round(len(q) / s, 1), "seconds": round(s, 3), "load": _load()}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)]))


def build_child(embeddings: Path, kind: str, params: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """``raeflow index --rebuild`` in a child process: its own build seconds and peak RSS (VmHWM, imports
    included), the wall time with the process start-up, the sizes. ``threads``: faiss threads for the build
    (the queries are always timed on one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "raeflow.cli.main", "index", "-e", str(embeddings), "--kind", kind,
               "--rebuild", "--json", str(summary), "--threads", str(threads)]
        for k, v in params.items():
            cmd += ["-p", f"{k}={json.dumps(v)}"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
        s = json.loads(summary.read_text())
    return {"seconds": round(s["seconds"], 1), "wall_with_startup_s": round(wall, 1),
            "peak_rss_bytes": s["peak_rss_bytes"], "index_file_bytes": s["memory_bytes"],
            "vectors_file_bytes": s["index_bytes"] - s["memory_bytes"], "load": _load(),
            "log": [ln for ln in proc.stdout.strip().splitlines() if not ln.startswith("WARNING")]}


#: Query-time settings tried per kind (the first that reaches the recall goal is the one to ship).
SWEEPS: dict[str, tuple[str, list[int]]] = {"hnsw": ("ef_search", [16, 32, 64, 128]),
                                            "ivfpq": ("nprobe", [4, 8, 16, 32])}


def bench_index(embeddings: str, model: str, *, kinds: list[str] = ("hnsw", "ivfpq"), k: int = 10,
                queries: str = "mnist:test", recall_queries: int = 1000, batch: int = 1000,
                single_budget_s: float = 20.0, build_params: dict[str, dict[str, Any]] | None = None,
                build_threads: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    from raeflow.embed.vectors import top_k
    from raeflow.index import open_index

    out = Path(embeddings)
    with _one_thread():
        t = time.perf_counter()
        base = load_vectors(out)
        log(f"bench index: {len(base):,} x {base.shape[1]} unit vectors loaded in {time.perf_counter() - t:.1f}s")
        q = encode_queries(model, queries, max(recall_queries, batch))
        report: dict[str, Any] = {"embeddings": str(out), "rows": len(base), "dim": base.shape[1], "k": k,
                                  "queries": f"{len(q):,} rows of {queries} encoded by the same model",
                                  "cpu": os.cpu_count(), "kinds": {}}
        exact = lambda x: top_k(x, base, k)  # noqa: E731
        report["exact_single_first"] = time_single(exact, q, single_budget_s, 1000)
        log(f"exact one at a time: {report['exact_single_first']}")
        t = time.perf_counter()
        truth = top_k(q[:recall_queries], base, k)[0]
        report["exact_batch"] = {"queries": recall_queries, "qps": round(recall_queries / (time.perf_counter() - t),
                                                                          1), "load": _load()}
        log(f"exact batched: {report['exact_batch']}")
        for kind in kinds:
            b = build_child(out, kind, (build_params or {}).get(kind, {}), build_threads)
            b["threads"] = build_threads
            log(f"{kind} build: {b['seconds']}s, peak RSS {b['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                f"index {b['index_file_bytes'] / 2**20:,.1f} MiB (+ vectors {b['vectors_file_bytes'] / 2**20:,.1f})")
            index = open_index(out, min_rows=0)
            name, values = SWEEPS[kind]
            rows = []
            for v in values:
                index.set_params(**{name: v})
                found = index.top_k(q[:recall_queries], k)[0]
                row = {name: v, "recall": round(recall(found, truth), 4),
                       "single": time_single(lambda x: index.top_k(x, k), q, single_budget_s / 2, 20000),
                       "batch": time_batch(lambda x: index.top_k(x, k), q[:batch])}
                log(f"{kind} {name}={v}: {row}")
                rows.append(row)
            report["kinds"][kind] = {"build": b, "params": index.info["params"], "sweep": rows}
            index = None  # free it before the next kind is built
        report["exact_single_last"] = time_single(exact, q[::-1], single_budget_s, 1000)
        log(f"exact one at a time (again): {report['exact_single_last']}")
    return report


def markdown(r: dict[str, Any]) -> str:
    ex1 = (r["exact_single_first"]["qps"] + r["exact_single_last"]["qps"]) / 2
    exb = r["exact_batch"]["qps"]
    lines = [f"{r['rows']:,} vectors of {r['dim']} floats, k={r['k']}, one thread; queries: {r['queries']}.",
             f"Exact: {ex1:,.1f} queries/s one at a time (mean of the runs first and last: "
             f"{r['exact_single_first']['qps']} at load {r['exact_single_first']['load']}, "
             f"{r['exact_single_last']['qps']} at load {r['exact_single_last']['load']}); "
             f"{exb:,.1f} queries/s in a batch of {r['exact_batch']['queries']} (load {r['exact_batch']['load']}).", "",
             "| kind | setting | recall@10 | q/s one at a time | × exact | p50 ms | q/s batched | × exact batched | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, v in r["kinds"].items():
        for row in v["sweep"]:
            (name, val), = [(n, row[n]) for n in row if n not in ("recall", "single", "batch")]
            lines.append(f"| {kind} | {name}={val} | {row['recall']:.4f} | {row['single']['qps']:,.0f} | "
                         f"{row['single']['qps'] / ex1:,.0f}× | {row['single']['p50_ms']} | {row['batch']['qps']:,.0f}"
                         f" | {row['batch']['qps'] / exb:,.1f}× | {row['single']['load']} |")
    lines += ["", "| kind | build s (process start-up excluded) | peak RSS of the build process | index in memory | "
              "+ vectors on disk | load |",
              "|---|---|---|---|---|---|"]
    for kind, v in r["kinds"].items():
        b = v["build"]
        lines.append(f"| {kind} | {b['seconds']} | {b['peak_rss_bytes'] / 2**20:,.0f} MiB | "
                     f"{b['index_file_bytes'] / 2**20:,.1f} MiB | {b['vectors_file_bytes'] / 2**20:,.1f} MiB | "
                     f"{b['load']} |")
    return "\n".join(lines)


def compare_libraries(base: np.ndarray, q: np.ndarray, k: int = 10, M: int = 16, ef_construction: int = 40,
                      ef_search: tuple[int, ...] = (32, 64, 128), budget_s: float = 5.0,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """faiss ``IndexHNSWFlat`` against usearch's HNSW with the same graph settings on the same unit vectors, one
    thread: build seconds, recall@k against the exact ``top_k``, queries/s one at a time. (How the library for
    ``raeflow index`` was chosen; usearch is not a dependency, so this imports it only here.)"""
    import faiss
    from usearch.index import Index as UIndex

    from raeflow.embed.vectors import top_k

    rows = []
    with _one_thread():
        truth = top_k(q, base, k)[0]
        t = time.perf_counter()
        f = faiss.IndexHNSWFlat(base.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        f.hnsw.efConstruction = ef_construction
        f.add(base)
        fb = time.perf_counter() - t
        t = time.perf_counter()
        u = UIndex(ndim=base.shape[1], metric="ip", dtype="f32", connectivity=M, expansion_add=ef_construction)
        u.add(np.arange(len(base)), base, threads=1)
        ub = time.perf_counter() - t
        log(f"build: faiss {fb:.1f}s, usearch {ub:.1f}s ({len(base):,} rows, load {_load()})")
        for ef in ef_search:
            f.hnsw.efSearch = ef
            u.expansion_search = ef
            ff = f.search(q, k)[1]
            uu = np.asarray(u.search(q, k, threads=1).keys, np.int64)
            fs = time_single(lambda x: f.search(x, k), q, budget_s, 20000)
            us = time_single(lambda x: u.search(x[0], k, threads=1), q, budget_s, 20000)
            row = {"ef_search": ef, "faiss": {"build_s": round(fb, 1), "recall": round(recall(ff, truth), 4), **fs},
                   "usearch": {"build_s": round(ub, 1), "recall": round(recall(uu, truth), 4), **us}}
            log(str(row))
            rows.append(row)
    return rows
