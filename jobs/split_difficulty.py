"""How hard each block of a labelled image dataset is for a model-free classifier: 1-nearest-neighbour error.

    .venv/bin/python jobs/split_difficulty.py [--dataset mnist] [--reference 50000] [--block 5000] [--json FILE]

The reference set is the first ``--reference`` training images; every later block of ``--block`` training images
(the built-in validation split is the last 5,000) and every block of the test split is classified by its nearest
reference image (Euclidean, on the pixels). No model and no training: if the blocks differ here, they differ in
difficulty, not by what a model learnt. Issue 17 found validation errors 0.3-0.6 points below test errors in every
MNIST fine-tuning grid; this says how much of that is the validation images themselves.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def nearest_neighbour_error(reference: np.ndarray, labels: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The share of ``x`` (N, D) whose nearest row of ``reference`` (M, D) has another label than ``y``: the k-NN of
    ``raeflow eval --task probe`` with k = 1, exhaustive."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(reference, labels)
    return float(np.mean(knn.predict(x) != y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--reference", type=int, default=50000, help="the first N training images are the reference")
    ap.add_argument("--block", type=int, default=5000, help="rows per block scored")
    ap.add_argument("--json", help="write the blocks' errors here")
    args = ap.parse_args()

    from raeflow.data import load_eval_data

    def flat(split):  # (N, D) float32 pixels and (N,) labels
        return split.x.reshape(len(split.x), -1).astype(np.float32), np.asarray(split.y)

    train_x, train_y = flat(load_eval_data(f"{args.dataset}:train"))
    test_x, test_y = flat(load_eval_data(f"{args.dataset}:test"))
    ref, ref_y = train_x[:args.reference], train_y[:args.reference]
    blocks = [("train", i, train_x, train_y) for i in range(args.reference, len(train_x), args.block)]
    blocks += [("test", i, test_x, test_y) for i in range(0, len(test_x), args.block)]
    rows = []
    for split, start, x, y in blocks:
        xb, yb = x[start:start + args.block], y[start:start + args.block]
        err = nearest_neighbour_error(ref, ref_y, xb, yb)
        rows.append({"split": split, "rows": [start, start + len(xb)], "error": err,
                     "std_error": math.sqrt(err * (1 - err) / len(xb))})
        print(f"{split} rows {start}-{start + len(xb)}: 1-NN error {100 * err:.2f}% "
              f"+- {100 * rows[-1]['std_error']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "reference": args.reference,
                                               "blocks": rows}, indent=1))


if __name__ == "__main__":
    main()
