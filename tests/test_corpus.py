"""The generated corpus (raeflow.data.corpus): distinct rows, reproducible per row, labels of the source digit,
and files the embed input layer reads."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raeflow.data.corpus import Corpus, write_corpus


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(seed=7)


def test_rows_are_distinct_even_from_the_same_source_digit(corpus):
    images, _, src = corpus.rows(0, 3000)
    assert len({im.tobytes() for im in images}) == 3000
    again, _, src2 = corpus.rows(60_000, 60_100)  # same source digits as rows 0..99, other distortions
    assert np.array_equal(src2, src[:100])
    assert all(not np.array_equal(a, b) for a, b in zip(again, images[:100]))


def test_row_i_is_the_same_image_whatever_the_chunking_and_depends_on_the_seed(corpus):
    whole, labels, _ = corpus.rows(0, 500)
    pieces = np.concatenate([corpus.rows(s, min(500, s + 64))[0] for s in range(0, 500, 64)])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(Corpus(seed=7, source=corpus.source, source_labels=corpus.source_labels).rows(123, 130)[0],
                          whole[123:130])
    other = Corpus(seed=8, source=corpus.source, source_labels=corpus.source_labels).rows(0, 500)[0]
    assert sum(np.array_equal(a, b) for a, b in zip(other, whole)) == 0


def test_labels_are_the_source_digits_and_images_stay_close_to_them(corpus):
    images, labels, src = corpus.rows(1000, 1400)
    assert np.array_equal(src, np.arange(1000, 1400) % 60_000)
    assert np.array_equal(labels, corpus.source_labels[src])
    # A small distortion of a digit correlates with it far more than with another digit of another class.
    a = images.reshape(400, -1).astype(np.float32)
    b = corpus.source[src].reshape(400, -1).astype(np.float32)
    same = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    other = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, np.roll(b, 1, axis=0))]
    assert np.median(same) > 0.5 and np.median(same) > np.median(other) + 0.3


def test_parquet_corpus_is_chunked_and_readable_by_embed(tmp_path, corpus):
    from raeflow.data.sources import Prep, open_source

    out = write_corpus(tmp_path / "c", 300, seed=7, chunk_rows=128, log=lambda _: None)
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 3
    t = pq.read_table(out)
    assert t.column("id").to_pylist()[:2] == ["corpus:0", "corpus:1"]
    images, labels, _ = corpus.rows(0, 300)
    stored = np.asarray(t.column("image").combine_chunks().flatten()).reshape(300, 28, 28)
    assert np.array_equal(stored, images)
    assert t.column("label").to_pylist() == [str(v) for v in labels]
    src = open_source(str(out), Prep("image", (1, 28, 28)))
    assert (src.total, src.x_dtype, src.id_column, src.label_column) == (300, "uint8", "id", "label")
    with pytest.raises(FileExistsError):
        write_corpus(out, 10, log=lambda _: None)


def test_folder_corpus_has_one_subfolder_per_label(tmp_path, corpus):
    from PIL import Image

    out = write_corpus(tmp_path / "f", 40, fmt="folder", seed=7, log=lambda _: None)
    images, labels, _ = corpus.rows(0, 40)
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 40
    f = out / str(labels[5]) / "5.png"
    assert np.array_equal(np.asarray(Image.open(f)), images[5])
