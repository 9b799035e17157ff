"""The streamed read (raeflow.data.stream): the same rows, the same validation split and the same vocabulary as
the in-memory read; the per-block step checked without Ray."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from raeflow.data import load_training_data
from raeflow.data.corpus import write_corpus
from raeflow.data.rows import ERROR, ID, TEXT, X
from raeflow.data.stream import TrainRows, as_float, choose_read, probe
from raeflow.errors import InputError


def _rows(x) -> list[str]:
    """A multiset of rows as sorted digests: order-free (Ray Data does not keep block order)."""
    a = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), -1))
    return sorted(hashlib.sha1(r.tobytes()).hexdigest() for r in a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # Two files, so the split and the reads cross file boundaries.
    out = tmp_path_factory.mktemp("stream") / "corpus"
    return write_corpus(out, 700, chunk_rows=400, log=lambda s: None)


def test_probe_and_the_auto_choice(corpus, tmp_path, monkeypatch):
    assert probe(str(corpus)) == ("image", (1, 28, 28))
    assert choose_read("auto", "digits") == ("memory", "built-in dataset")
    how, why = choose_read("auto", str(corpus))
    assert how == "memory" and "700 rows" in why
    monkeypatch.setenv("RAEFLOW_MAX_DATA_BYTES", str(1 << 20))  # 700 x 784 x 4 B = 2.2 MB > half of 1 MiB
    how, why = choose_read("auto", str(corpus))
    assert how == "stream" and "over 50% of the" in why
    with pytest.raises(InputError, match="built-in"):
        choose_read("stream", "mnist")


def test_train_rows_split_scale_and_refuse_bad_rows():
    ids = [f"r{i}" for i in range(200)]
    from raeflow.data.core import in_validation

    held = in_validation(ids, 0.25)
    assert 25 < held.sum() < 75  # about a quarter, decided per id
    x = np.arange(200 * 4, dtype=np.uint8).reshape(200, 4)
    block = pa.table({ID: ids, ERROR: pa.nulls(200, pa.string()),
                      X: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)})
    val = TrainRows(val=True, fraction=0.25, shape=(1, 2, 2))(block)["x"]
    train = TrainRows(val=False, fraction=0.25, shape=(1, 2, 2))(block)["x"]
    assert val.shape == (held.sum(), 1, 2, 2) and train.shape == ((~held).sum(), 1, 2, 2)
    assert val.dtype == np.uint8  # a quarter of float32's bytes in flight; the worker scales each batch
    np.testing.assert_allclose(as_float(val).reshape(-1, 4), x[held] / 255.0, rtol=1e-6)  # bytes / 255, as in memory
    import torch

    t = as_float(torch.from_numpy(val))
    assert t.dtype == torch.float32 and torch.allclose(t.reshape(-1, 4), torch.from_numpy(x[held] / 255.0).float())
    none = TrainRows(val=True, fraction=0.0, shape=(1, 2, 2))(block)["x"]  # no row of this block is held out
    assert none.shape == (0, 1, 2, 2)
    bad = block.set_column(1, ERROR, pa.array([None] * 199 + ["r199: not a readable image"], pa.string()))
    with pytest.raises(InputError, match="r199: not a readable image"):
        TrainRows(val=False, fraction=0.25, shape=(1, 2, 2))(bad)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_streamed_and_in_memory_reads_see_the_same_rows_and_split(ray_local, corpus, tmp_path):
    from raeflow.data.stream import open_streamed

    mem = load_training_data(str(corpus))
    st = open_streamed(str(corpus), log=lambda s: None)
    assert (len(st.train), len(st.val)) == (len(mem.train), len(mem.val)) and len(mem.val) > 0
    ds = st.datasets()
    for name, ref in (("train", mem.train.x), ("val", mem.val.x)):
        got = np.concatenate([as_float(b["x"]) for b in ds[name].iter_batches(batch_size=None,
                                                                             batch_format="numpy")])
        assert got.shape[1:] == (1, 28, 28)
        assert _rows(got) == _rows(ref), name

    # Documents: the vocabulary counted block by block in Ray tasks is the in-memory one, and so are the rows.
    docs = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    docs.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 5))}) + "\n" for _ in range(300)))
    mem = load_training_data(str(docs), vocab_size=8)
    st = open_streamed(str(docs), vocab_size=8, log=lambda s: None)
    assert st.vectoriser.vocabulary == mem.vectoriser.vocabulary
    assert (len(st.train), len(st.val)) == (len(mem.train), len(mem.val))
    got = np.concatenate([b["x"] for b in st.datasets()["val"].iter_batches(batch_size=None, batch_format="numpy")])
    assert _rows(got) == _rows(mem.val.x[:])


def test_text_rows_are_vectorised_per_block():
    from raeflow.data.text import Vectoriser

    vec = Vectoriser(4, "counts").fit(["cats run", "dogs run", "run run"])
    block = pa.table({ID: ["a", "b"], ERROR: pa.nulls(2, pa.string()), TEXT: ["cats run", "dogs"]})
    x = TrainRows(val=False, fraction=0.0, shape=(len(vec.vocabulary),), vectoriser=vec.to_json())(block)["x"]
    np.testing.assert_allclose(x, vec.transform(["cats run", "dogs"]))


def test_window_shuffle_yields_every_row_once_in_full_seeded_batches():
    import torch

    from raeflow.train.loop import window_shuffled

    rows = torch.arange(1000)
    windows = [(rows[a:a + 300], rows[a:a + 300] * 10) for a in range(0, 1000, 300)]  # 300, 300, 300, 100
    out = list(window_shuffled(windows, 64, seed=3, drop_last=False))
    assert [len(x) for x, _ in out] == [64] * 15 + [40]  # leftovers lead the next window: only the last is short
    got = torch.cat([x for x, _ in out])
    assert sorted(got.tolist()) == list(range(1000))  # every row once
    assert all(torch.equal(y, x * 10) for x, y in out)  # labels travel with their rows
    first = got[:300]
    assert not torch.equal(first, torch.arange(300)) and sorted(first.tolist()) == list(range(300))  # mixed within a window
    again = torch.cat([x for x, _ in window_shuffled(windows, 64, seed=3, drop_last=False)])
    other = torch.cat([x for x, _ in window_shuffled(windows, 64, seed=4, drop_last=False)])
    assert torch.equal(got, again) and not torch.equal(got, other)  # seeded
    assert sum(len(x) for x, _ in window_shuffled(windows, 64, seed=3, drop_last=True)) == 960
    plain = torch.cat([x for x, _ in window_shuffled(windows, 64, seed=None, drop_last=False)])
    assert torch.equal(plain, rows)  # no seed: the stream's order
