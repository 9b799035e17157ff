"""Datasets as arrays: what every trainer, evaluator and embedder consumes.

A dataset spec is ``name`` or ``name:split`` (``train`` / ``test``) for a built-in corpus, or a path to user
data. Images are ``(N, C, H, W)`` float32 in [0, 1] (pixels = bytes / 255); documents are ``(N, V)`` float32
vectors from a :class:`~raeflow.data.text.Vectoriser` fitted on the training split. The validation split is
carved from the end of the training split; the official test split is only for ``raeflow eval``.
"""
from __future__ import annotations

import hashlib
import os

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from raeflow.errors import InputError

@dataclass
class RawSplit:
    """One split as its source gives it: images as arrays, or documents as strings (vectorised later)."""

    x: np.ndarray | list[str]  # (N, C, H, W) float32 in [0, 1], or N document strings
    y: np.ndarray | None  # (N,) int64 labels
    classes: list[str] | None
    ids: list[str] | None = None  # per-row ids for user data (paths relative to the input root)


@dataclass
class BuiltinDataset:
    name: str
    kind: str  # "image" | "text"
    summary: str  # one line for `raeflow datasets`: content, size, licence, how to install
    load: Callable[[str], RawSplit]  # split -> RawSplit
    splits: tuple[str, ...] = ("train", "test")


def register_dataset(name: str, kind: str, summary: str, splits: tuple[str, ...] = ("train", "test")):
    """Marks a loader ``split -> RawSplit`` as a built-in corpus (``fn.builtin``); :mod:`raeflow.data.catalog`
    collects the marked loaders of the corpus modules it lists. No global table here: what is known never
    depends on which modules happened to be imported."""

    def wrap(fn: Callable[[str], RawSplit]):
        fn.builtin = BuiltinDataset(name, kind, summary, fn, splits)  # type: ignore[attr-defined]
        return fn

    return wrap


class SparseRows:
    """``(N, V)`` float32 rows held as CSR: how document vectors stay in memory (a few percent of the dense size).

    Indexing gives **dense** rows, what a model takes: ``rows[slice | ndarray]`` an ndarray, ``rows[LongTensor]``
    a tensor (a training batch, :class:`~raeflow.train.loop.TensorBatches`). :meth:`take` keeps rows sparse (a
    split of a dataset).
    """

    def __init__(self, csr: Any):
        self.csr = csr.tocsr().astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.csr.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.csr.data.nbytes + self.csr.indices.nbytes + self.csr.indptr.nbytes)

    def __len__(self) -> int:
        return int(self.csr.shape[0])

    def take(self, idx: slice | np.ndarray) -> "SparseRows":
        return SparseRows(self.csr[idx])

    def __getitem__(self, idx: Any) -> Any:
        import torch

        if isinstance(idx, torch.Tensor):
            return torch.from_numpy(self.csr[idx.numpy()].toarray())
        if isinstance(idx, (int, np.integer)):
            return self.csr[int(idx)].toarray()[0]
        return self.csr[idx].toarray()


@dataclass
class ArrayDataset:
    """A split ready for a model: float32 features, optional int64 labels, and where it came from."""

    name: str  # the spec's name part, e.g. "mnist" (or the user path)
    split: str  # "train" | "val" | "test" | "all"
    x: np.ndarray | SparseRows  # (N, C, H, W) float32, or (N, V) document vectors (sparse for training)
    y: np.ndarray | None = None  # (N,) int64
    classes: list[str] | None = None
    kind: str = "image"
    ids: list[str] | None = None  # per-row ids when the source has them (user files); else derived
    preprocessing: dict[str, Any] = field(default_factory=dict)  # recorded in the model's config.json

    def __post_init__(self):
        if len(self.x) == 0:
            raise InputError(f"dataset {self.name}:{self.split} is empty")
        if self.y is not None and len(self.y) != len(self.x):
            raise InputError(f"{self.name}:{self.split}: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape: what a model's ``input_shape`` must be."""
        return tuple(self.x.shape[1:])

    def row_ids(self) -> list[str]:
        return self.ids if self.ids is not None else [f"{self.name}:{self.split}:{i}" for i in range(len(self))]

    def subset(self, idx: slice | np.ndarray, split: str | None = None) -> "ArrayDataset":
        x = self.x.take(idx) if isinstance(self.x, SparseRows) else self.x[idx]
        return ArrayDataset(self.name, split or self.split, x, None if self.y is None else self.y[idx],
                            self.classes, self.kind, None if self.ids is None else list(np.asarray(self.ids)[idx]),
                            dict(self.preprocessing))

    def meta(self) -> dict[str, Any]:
        """What the model's config.json records of its data."""
        return {"name": self.name, "kind": self.kind, "input_shape": list(self.shape), "classes": self.classes,
                "preprocessing": self.preprocessing}


def validation_size(n_train: int, requested: int | float | None) -> int:
    """Default: the last 5,000 rows, but never more than 10% of a small training set (digits)."""
    if requested is None:
        return min(5000, n_train // 10)
    k = int(round(requested * n_train)) if isinstance(requested, float) and requested < 1 else int(requested)
    if not 0 <= k < n_train:
        raise InputError(f"validation size {requested} leaves no training data out of {n_train}")
    return k


def validation_fraction(n_train: int, requested: int | float | None) -> float:
    """The share of a user corpus held out for validation: :func:`validation_size`'s rows over ``n_train``."""
    return validation_size(n_train, requested) / n_train if n_train else 0.0


def in_validation(ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which rows of a user corpus are validation rows: those whose id hashes below ``fraction``.

    A rule on each row alone -- no pass over the corpus, no order -- so a streamed run (each Ray task deciding
    for its own rows) and an in-memory run hold out exactly the same rows, and a corpus read in another order
    or grown by new files keeps its old rows where they were. (Built-in datasets keep their documented split:
    the last 5,000 training rows, which published figures depend on.)"""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    cut = int(fraction * 2**64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode("utf-8", "surrogatepass"),
                                                       digest_size=8).digest(), "big") < cut for i in ids),
                       bool, count=len(ids))


# ------------------------------------------------------------------------------------------- memory budget
def data_budget() -> int:
    """Bytes a dense training array may take: ``RAEFLOW_MAX_DATA_BYTES``, else a quarter of this machine's
    memory (the model, its optimiser and Ray's object store need the rest)."""
    env = os.environ.get("RAEFLOW_MAX_DATA_BYTES")
    if env:
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 << 30


def check_budget(rows: int, per_row: int, what: str) -> None:
    """InputError before allocating ``rows x per_row`` float32 over :func:`data_budget`."""
    need, budget = 4 * rows * per_row, data_budget()
    if need > budget:
        raise InputError(f"{what}: {rows:,} rows x {per_row:,} values would take {need / 2**30:.1f} GiB as float32, "
                         f"over the {budget / 2**30:.1f} GiB budget for training data (RAEFLOW_MAX_DATA_BYTES); "
                         "use fewer rows, a smaller image size or vocabulary")
