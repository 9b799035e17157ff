"""The dataset layer: built-in corpora by name (``mnist``, ``mnist:test``, ``20newsgroups``…) or user data by path.

``load_training_data`` gives the train and validation splits (and the fitted document vectoriser);
``load_eval_data`` gives a held-out split preprocessed exactly as the model's training data was.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raeflow.data.catalog import known_datasets, parse_spec  # noqa: F401
from raeflow.data.core import ArrayDataset, RawSplit, SparseRows, register_dataset, validation_size  # noqa: F401
from raeflow.errors import InputError


@dataclass
class TrainingData:
    train: ArrayDataset
    val: ArrayDataset | None
    vectoriser: Any = None  # raeflow.data.text.Vectoriser for documents, saved with the model


def _raw(spec: str, default_split: str) -> tuple[str, str, str, RawSplit]:
    """Resolve a spec to (name, split, kind, RawSplit) for built-ins and user paths alike."""
    datasets = known_datasets()
    name, split = parse_spec(spec)
    if name in datasets:
        ds = datasets[name]
        split = split or default_split
        if split not in ds.splits:
            raise InputError(f"dataset {name!r} has no split {split!r}; it has {list(ds.splits)}")
        return name, split, ds.kind, ds.load(split)
    if Path(spec).exists():
        from raeflow.data.user import load_user_data

        kind, raw = load_user_data(spec)
        return str(spec), "all", kind, raw
    known = ", ".join(sorted(datasets))
    raise InputError(f"unknown dataset {spec!r}: not a built-in dataset ({known}) nor an existing path")


def load_training_data(spec: str, val_size: int | float | None = None, *, vocab_size: int = 2000,
                       weighting: str = "log") -> TrainingData:
    """The training split of ``spec`` less its last ``val_size`` rows (the validation split).

    Documents are vectorised with a vocabulary fitted on the training rows only, so validation and test
    scores are honest; the fitted vectoriser travels with the model.
    """
    name, split, kind, raw = _raw(spec, "train")
    if split == "test":
        raise InputError(f"{spec}: the test split is for `raeflow eval`, not for training")
    n = len(raw.x)
    k = validation_size(n, val_size)
    cut = n - k
    y = raw.y
    if kind == "text":
        from raeflow.data.text import Vectoriser

        vec = Vectoriser(vocab_size=vocab_size, weighting=weighting).fit(raw.x[:cut])
        x = SparseRows(vec.transform_sparse(raw.x))  # dense only per batch: a large corpus fits as CSR
        prep = {"vectoriser": vec.describe()}
    else:
        vec, x, prep = None, np.ascontiguousarray(raw.x, dtype=np.float32), {"pixels": "bytes/255"}
    full = ArrayDataset(name, split, x, y, raw.classes, kind, raw.ids, prep)
    train = full.subset(slice(0, cut), "train")
    val = full.subset(slice(cut, n), "val") if k else None
    return TrainingData(train, val, vec)


def load_eval_data(spec: str, vectoriser: Any = None, default_split: str = "test", *,
                   sparse: bool = False) -> ArrayDataset:
    """A split preprocessed as at training time (documents through the model's saved ``vectoriser``; as
    :class:`SparseRows` with ``sparse``, for training on them: fine-tuning)."""
    name, split, kind, raw = _raw(spec, default_split)
    if kind == "text":
        if vectoriser is None:
            raise InputError(f"{spec} holds documents: pass the model's vectoriser (saved with the model)")
        x = SparseRows(vectoriser.transform_sparse(raw.x)) if sparse else vectoriser.transform(raw.x)
        prep = {"vectoriser": vectoriser.describe()}
    else:
        x, prep = np.ascontiguousarray(raw.x, dtype=np.float32), {"pixels": "bytes/255"}
    return ArrayDataset(name, split, x, raw.y, raw.classes, kind, raw.ids, prep)
