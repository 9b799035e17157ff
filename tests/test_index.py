"""The ANN index (raeflow.index): recall against the exact search, refusal of a foreign or stale index,
incremental adds, and the exact search itself against scikit-learn's brute force. No Ray; faiss on one thread."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)

from raeflow.embed.encoder import EMBEDDING, ID, LABEL, SOURCE, to_vectors  # noqa: E402
from raeflow.embed.encoder import embedding_schema  # noqa: E402
from raeflow.embed.output import PART, write_atomic  # noqa: E402
from raeflow.embed.search import Index, normalise, top_k  # noqa: E402
from raeflow.index import IndexMismatch, build_index, open_index  # noqa: E402

SHA_A, SHA_B = "a" * 64, "b" * 64
DIM = 16
#: Small IVF-PQ settings for 10k rows (64-centroid sub-quantisers: train in seconds, not the 20 s of 256).
SMALL = {"hnsw": None, "ivfpq": {"nlist": 64, "m": 8, "nbits": 6}}


def clustered(n: int, seed: int) -> np.ndarray:
    """(n, DIM) float32 around 50 centres: neighbourhoods like an encoder's codes, not uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, DIM))
    return (centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


def write_part(out: Path, part: int, vectors: np.ndarray, first: int, sha: str = SHA_A) -> None:
    """One `raeflow embed` part file (same schema and metadata keys), written without Ray."""
    meta = {"raeflow.variant": "ae", "raeflow.model_sha256": sha, "raeflow.version": "test", "raeflow.input": "x"}
    n, dim = vectors.shape
    table = pa.table({ID: pa.array([f"row{first + i}" for i in range(n)]),
                      EMBEDDING: to_vectors(vectors, np.zeros(n, bool)),
                      LABEL: pa.array([f"c{(first + i) % 7}" for i in range(n)]),
                      SOURCE: pa.array([str(first + i) for i in range(n)])}).cast(embedding_schema(dim, frozenset({"encode"}), error=False, metadata=meta))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(table, out / PART.format(part))


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """10,000 rows (two part files' worth) and 200 held-out queries from the same distribution."""
    v = clustered(10_200, seed=0)
    return v[:10_000], v[10_000:]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_recall_against_exact_search(tmp_path, corpus, kind):
    base, queries = corpus
    write_part(tmp_path, 0, base[:6000], 0)
    write_part(tmp_path, 1, base[6000:], 6000)
    s = build_index(tmp_path, kind, SMALL[kind], log=lambda _: None)
    assert (s.rows, s.added, s.incremental) == (10_000, 10_000, False)
    index = open_index(tmp_path, SHA_A, min_rows=0)
    truth, _ = top_k(normalise(queries), normalise(base), 10)
    found, score = index.top_k(normalise(queries), 10)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert rec >= 0.95, f"{kind} recall@10 {rec:.3f}"
    assert np.all(np.diff(score, axis=1) <= 1e-6)  # best first
    # Hits carry the ids and labels of the right rows: a stored vector finds itself with cosine 1.
    hits = index.search(base[[7000]], 3)[0]
    assert (hits[0].id, hits[0].label) == ("row7000", f"c{7000 % 7}")
    assert hits[0].score == pytest.approx(1.0, abs=1e-3 if kind == "ivfpq" else 1e-5)


def test_small_sets_stay_exact(tmp_path, corpus):
    write_part(tmp_path, 0, corpus[0][:2000], 0)
    assert open_index(tmp_path) is None  # no index yet
    build_index(tmp_path, "hnsw", log=lambda _: None)
    assert open_index(tmp_path) is None  # 2,000 rows < EXACT_BELOW: the exact product is as fast
    assert len(open_index(tmp_path, min_rows=0)) == 2000


def test_foreign_index_is_refused(tmp_path, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    write_part(a, 0, corpus[0][:3000], 0, sha=SHA_A)
    write_part(b, 0, corpus[0][:3000], 0, sha=SHA_B)
    build_index(a, "hnsw", log=lambda _: None)
    with pytest.raises(IndexMismatch, match="not comparable"):
        open_index(a, SHA_B, min_rows=0)  # query model B against model A's codes
    shutil.copytree(a / "_index", b / "_index")  # model A's index copied beside model B's embeddings
    with pytest.raises(IndexMismatch, match="another model's index"):
        open_index(b, min_rows=0)
    with pytest.raises(IndexMismatch, match="another model's index"):
        build_index(b, log=lambda _: None)  # extending it is refused as well


def test_changed_embeddings_are_refused(tmp_path, corpus):
    write_part(tmp_path, 0, corpus[0][:3000], 0)
    build_index(tmp_path, "hnsw", log=lambda _: None)
    write_part(tmp_path, 0, corpus[0][:2500], 0)  # part 0 rewritten: row numbers no longer match
    with pytest.raises(IndexMismatch, match="changed"):
        open_index(tmp_path, min_rows=0)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_rows_embedded_later_are_added_without_rebuild(tmp_path, corpus, kind):
    base = corpus[0]
    write_part(tmp_path, 0, base[:8000], 0)
    build_index(tmp_path, kind, SMALL[kind], log=lambda _: None)
    trained = (tmp_path / "_index" / "index.faiss").stat().st_mtime_ns
    write_part(tmp_path, 1, base[8000:], 8000)  # what `raeflow embed --resume` commits: a new part number
    with pytest.raises(IndexMismatch, match="raeflow index --embeddings"):
        open_index(tmp_path, min_rows=0)
    s = build_index(tmp_path, log=lambda _: None)
    assert (s.incremental, s.added, s.rows) == (True, 2000, 10_000)
    assert (tmp_path / "_index" / "index.faiss").stat().st_mtime_ns != trained
    index = open_index(tmp_path, min_rows=0)
    assert len(index) == 10_000
    assert index.search(base[[9500]], 1)[0][0].id == "row9500"  # a row from the added file
    assert index.search(base[[100]], 1)[0][0].id == "row100"  # and the old ones are still there
    assert build_index(tmp_path, log=lambda _: None).added == 0  # up to date: nothing to do
    with pytest.raises(ValueError, match="--rebuild"):
        build_index(tmp_path, "ivfpq" if kind == "hnsw" else "hnsw", log=lambda _: None)


def test_exact_search_equals_sklearn_brute_force(corpus):
    from sklearn.neighbors import NearestNeighbors

    base, queries = corpus[0][:3000], corpus[1]
    exact = Index([f"r{i}" for i in range(len(base))], base)
    hits = exact.search(queries, 10)
    nn = NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(base)
    dist, idx = nn.kneighbors(queries)
    assert [[h.id for h in row] for row in hits] == [[f"r{j}" for j in row] for row in idx]
    np.testing.assert_allclose([[h.score for h in row] for row in hits], 1 - dist, atol=1e-5)


def test_search_and_serve_use_the_index_and_exact_forces_the_exact_search(tmp_path, monkeypatch):
    """`raeflow search` and Serve's index loading, end to end on a real (random-weight) MNIST model."""
    import raeflow.index.query
    from raeflow.bench.embed import make_model
    from raeflow.data.images import load_mnist
    from raeflow.embed.encoder import Encoder
    from raeflow.embed.search import search
    from raeflow.io import model_sha256
    from raeflow.serve.search import load_indexes, search_index
    from raeflow.serve.service import ModelService

    md = make_model(tmp_path / "m", seed=0)
    codes = Encoder(md, threads=1).encode_array(np.asarray(load_mnist("test").x[:400], np.float32))[0]  # (400, 30)
    out = tmp_path / "emb"
    write_part(out, 0, codes, 0, sha=model_sha256(md))
    build_index(out, "hnsw", log=lambda _: None)
    exact = search(out, md, "mnist:test:17", k=5)  # 400 rows < EXACT_BELOW: the exact search answers
    assert exact["search"] == "exact" and exact["hits"][0]["id"] == "row17"
    monkeypatch.setattr(raeflow.index.query, "EXACT_BELOW", 0)
    ann = search(out, md, "mnist:test:17", k=5)
    assert ann["search"].startswith("hnsw index")
    assert [h["id"] for h in ann["hits"]] == [h["id"] for h in exact["hits"]]
    assert search(out, md, "mnist:test:17", k=5, exact=True)["search"] == "exact"
    other = make_model(tmp_path / "other", seed=1)
    with pytest.raises(IndexMismatch, match="not comparable"):
        search(out, other, "mnist:test:17")
    svc = ModelService.load(md, name="ae")
    served = load_indexes([{"name": "digits", "path": str(out)}], {"ae": svc})
    assert type(served["digits"].index).__name__ == "AnnIndex"
    res = search_index(served, svc, codes[[17, 3]], 2, None)
    assert [r[0]["id"] for r in res["results"]] == ["row17", "row3"]


def test_bench_queries_are_unit_codes_of_held_out_rows(embed_digits_ae):
    """`raeflow bench index` encodes its queries (held-out built-in rows) with the embeddings' model: the codes the
    exact search and the index are compared on, one unit vector per row."""
    from raeflow.bench.index import encode_queries
    from raeflow.data.catalog import known_datasets
    from raeflow.embed.encoder import Encoder

    q = encode_queries(embed_digits_ae, "digits:test", 7)
    assert q.shape == (7, 6)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, rtol=1e-5)
    x = np.asarray(known_datasets()["digits"].load("test").x[:7], np.float32)
    np.testing.assert_allclose(q, normalise(Encoder(embed_digits_ae).encode_array(x)[0]), rtol=1e-5, atol=1e-6)


def test_bench_index_names_an_empty_embeddings_directory(tmp_path):
    from raeflow.bench.index import load_vectors
    from raeflow.errors import MissingFileError

    with pytest.raises(MissingFileError, match="no part-"):
        load_vectors(tmp_path)
