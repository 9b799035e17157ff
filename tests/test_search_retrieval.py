"""Exact cosine search (``Index``, ``raeflow search``) and retrieval evaluation (``raeflow eval --task
retrieval``). No Ray: embeddings directories are written with the job's own ``PartWriter`` from ``Encoder``
output, as the job writes them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raeflow.cli.main import app
from raeflow.embed.encoder import Encoder
from raeflow.embed.output import PartWriter, errors_schema, metadata, output_schema
from raeflow.embed.retrieval import (RECALL_LEVELS, format_table, image_retrieval, plot_retrieval,
                                     precision_at_k, precision_at_recall)
from raeflow.embed.search import Index, top_k


def _write_embeddings(model: str, out: Path, ids: list[str], labels: list[str | None], x=None, text=None) -> Path:
    enc = Encoder(model)
    meta = metadata(enc.artifact, "test")
    w = PartWriter(out, output_schema(enc, meta), errors_schema(meta), rows_per_file=128)
    batch = {"id": ids, "label": labels}
    batch.update({"x": x} if x is not None else {"text": text})
    w.add(enc(batch))
    w.close()
    return out


@pytest.fixture(scope="module")
def digits_test():
    from raeflow.data.images import load_digits

    return load_digits("test")


@pytest.fixture(scope="module")
def digits_embeddings(embed_digits_ae, digits_test, tmp_path_factory) -> Path:
    raw = digits_test
    ids = [f"digits:test:{i}" for i in range(len(raw.x))]
    labels = [raw.classes[int(v)] for v in raw.y]
    return _write_embeddings(embed_digits_ae, tmp_path_factory.mktemp("emb") / "digits", ids, labels, x=raw.x)


# ------------------------------------------------------------------------------------------------ search
def test_top_k_equals_scikit_learn_brute_force_cosine():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 7)).astype(np.float32)
    q = rng.normal(size=(9, 7)).astype(np.float32)
    index = Index([f"r{i}" for i in range(500)], base)
    hits = index.search(q, k=12)
    dist, idx = NearestNeighbors(n_neighbors=12, metric="cosine", algorithm="brute").fit(base).kneighbors(q)
    np.testing.assert_array_equal([[int(h.id[1:]) for h in row] for row in hits], idx)
    np.testing.assert_allclose([[h.score for h in row] for row in hits], 1 - dist, atol=1e-5)
    # a zero query has cosine 0 with everything; k is capped at the index size
    assert all(h.score == 0.0 for h in index.search(np.zeros(7), k=3)[0])
    assert len(Index(["a", "b"], base[:2]).search(q[0], k=10)[0]) == 2
    with pytest.raises(ValueError, match="7 values"):
        index.search(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="k must be"):
        index.search(q, k=0)
    # leave-one-out exclusion, as retrieval evaluation uses it
    i, s = top_k(index.vectors, index.vectors, 1, exclude=np.arange(500))
    assert (i[:, 0] != np.arange(500)).all() and (s < 1.0 - 1e-6).all()


def test_index_loads_an_embeddings_directory(digits_embeddings, digits_test):
    index = Index.load(digits_embeddings)
    assert len(index) == 300 and index.dim == 6 and index.metadata["raeflow.variant"] == "ae"
    own = index.vectors[17]
    (best, *rest), = index.search(own, k=10)
    assert best.id == "digits:test:17" and best.score == pytest.approx(1.0, abs=1e-5)
    assert best.label == str(digits_test.y[17])
    assert [h.score for h in rest] == sorted((h.score for h in rest), reverse=True)
    assert set(best.to_dict()) == {"id", "score", "label"}


def test_search_command(embed_digits_ae, embed_digits_vae, embed_doc_ae, digits_embeddings, digits_test, tmp_path):
    r = CliRunner().invoke(app, ["search", "--embeddings", str(digits_embeddings), "--model", embed_digits_ae,
                                 "--query", "digits:test:5", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["rows"] == 300 and len(res["hits"]) == 3
    assert res["hits"][0]["id"] == "digits:test:5" and res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    png = tmp_path / "q.png"  # an image file of another size: resized as embed resizes it
    Image.fromarray(np.rint(digits_test.x[5, 0] * 255).astype(np.uint8)).resize((24, 24)).save(png)
    r = CliRunner().invoke(app, ["search", "-e", str(digits_embeddings), "-m", embed_digits_ae, "-q", str(png)])
    assert r.exit_code == 0, r.output
    assert "rank" in r.output and "digits:test:" in r.output and "cosine" in r.output

    r = CliRunner().invoke(app, ["search", "-e", str(digits_embeddings), "-m", embed_digits_vae, "-q", str(png)])
    assert r.exit_code == 2 and "not comparable" in r.output

    docs = ["oil prices rose as crude output fell", "the bank raised rates", "grain exports"]
    emb = _write_embeddings(embed_doc_ae, tmp_path / "docs", ["a", "b", "c"], [None] * 3, text=docs)
    r = CliRunner().invoke(app, ["search", "-e", str(emb), "-m", embed_doc_ae, "-q", docs[1], "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["hits"][0]["id"] == "b"


# --------------------------------------------------------------------------------------------- retrieval
def test_precision_at_recall_and_at_k_by_hand():
    # angles 0, 5.7, 16.7 and 90 degrees; labels A A B A
    codes = np.array([[1, 0], [1, 0.1], [1, 0.3], [0, 1]], np.float32)
    labels = np.array(["A", "A", "B", "A"])
    # query 0 ranks 1 (A), 2 (B), 3 (A); query 1: 0 (A), 2 (B), 3 (A); query 3: 2 (B), 1 (A), 0 (A); query 2 has
    # no other B and is skipped. Recall 1/2 -> the first relevant item, recall 1 -> both.
    p, used = precision_at_recall(codes, labels, [0.001, 0.5, 1.0])
    assert used == 3
    np.testing.assert_allclose(p, [(1 + 1 + 1 / 2) / 3, (1 + 1 + 1 / 2) / 3, 2 / 3])
    assert precision_at_k(codes, labels, k=1) == pytest.approx(0.5)  # 0->1 yes, 1->0 yes, 2->1 no, 3->2 no


def test_image_retrieval_on_digits(embed_digits_ae, digits_test, tmp_path):
    from sklearn.neighbors import NearestNeighbors

    r = image_retrieval(embed_digits_ae, "digits", k=10)
    assert set(r["methods"]) == {"ae", "pixels", "pca"} and r["queries"] == 300
    assert r["methods"]["pca"]["dim"] == 6 and r["methods"]["pixels"]["dim"] == 64
    # the pixel-space figure, recomputed independently with scikit-learn
    x = digits_test.x.reshape(300, -1)
    _, idx = NearestNeighbors(n_neighbors=11, metric="cosine", algorithm="brute").fit(x).kneighbors(x)
    nn = np.array([[j for j in row if j != i][:10] for i, row in enumerate(idx)])
    want = float((digits_test.y[nn] == digits_test.y[:, None]).mean())
    assert r["methods"]["pixels"]["precision_at_k"] == pytest.approx(want, abs=1.5e-3)  # ties may order apart
    assert 0.5 < want < 1.0
    for m in r["methods"].values():
        assert 0.0 <= m["precision_at_k"] <= 1.0
    table = format_table(r)
    assert "precision@10" in table and "| ae (6-d) | pixels (64-d) | pca (6-d) |" in table
    png = plot_retrieval(r, tmp_path / "img.png")
    assert png.stat().st_size > 5000


def test_eval_retrieval_command_on_documents(embed_doc_ae, tmp_path):
    r = CliRunner().invoke(app, ["eval", "--model", embed_doc_ae, "--dataset", "reuters-r8", "--task", "retrieval",
                                 "--json", "--output", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["tasks"]["retrieval"]
    assert res["dataset"] == "reuters-r8:test" and res["levels"] == list(RECALL_LEVELS)
    assert set(res["methods"]) == {"ae", "lsa", "input"} and res["methods"]["lsa"]["dim"] == 5
    for m in res["methods"].values():
        assert len(m["precision"]) == len(RECALL_LEVELS) and all(0 <= v <= 1 for v in m["precision"])
    # LSA on Reuters-R8 finds same-topic documents first: far above the largest class's share (~0.5)
    assert res["methods"]["lsa"]["precision"][0] > 0.8
    assert Path(res["plot"]).stat().st_size > 5000
    saved = json.loads((tmp_path / "eval-reuters-r8.json").read_text())
    assert saved["tasks"]["retrieval"]["methods"]["ae"]["precision"] == res["methods"]["ae"]["precision"]
    assert "recall" in (tmp_path / "eval-reuters-r8.md").read_text()
    r = CliRunner().invoke(app, ["eval", "--model", embed_doc_ae, "--dataset", "reuters-r8", "--task", "nope"])
    assert r.exit_code == 2 and "unknown task" in r.output
