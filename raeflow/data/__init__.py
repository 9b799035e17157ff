"""The dataset layer: built-in corpora by name (``mnist``, ``mnist:test``, ``20newsgroups``…) or user data by path.

``load_training_data`` gives the train and validation splits (and the fitted document vectoriser);
``load_eval_data`` gives a held-out split preprocessed exactly as the model's training data was.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raeflow.data.catalog import builtin_split, known_datasets, parse_spec  # noqa: F401
from raeflow.data.core import (ArrayDataset, RawSplit, SparseRows, in_validation, register_dataset,  # noqa: F401
                               validation_fraction, validation_size)
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
        split = split or default_split
        ds = builtin_split(name, split)
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
    if name in known_datasets():  # the documented split: the last rows (RESULTS.md's figures depend on it)
        k = validation_size(n, val_size)
        train_rows, val_rows = np.arange(n - k), np.arange(n - k, n)
    else:  # user corpora: by a hash of each row's id, the rule a streamed run applies task by task
        held = in_validation(raw.ids if raw.ids is not None else [str(i) for i in range(n)],
                             validation_fraction(n, val_size))
        train_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
        if not len(train_rows):
            raise InputError(f"{spec}: all {n} rows fell in the validation split; give more rows or data.val_size=0")
    y = raw.y
    if kind == "text":
        from raeflow.data.text import Vectoriser

        vec = Vectoriser(vocab_size=vocab_size, weighting=weighting).fit(raw.x[i] for i in train_rows)
        x = SparseRows(vec.transform_sparse(raw.x))  # dense only per batch: a large corpus fits as CSR
        prep = {"vectoriser": vec.describe()}
    else:
        vec, x, prep = None, np.ascontiguousarray(raw.x, dtype=np.float32), {"pixels": "bytes/255"}
    full = ArrayDataset(name, split, x, y, raw.classes, kind, raw.ids, prep)
    train = full.subset(train_rows, "train")
    val = full.subset(val_rows, "val") if len(val_rows) else None
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
