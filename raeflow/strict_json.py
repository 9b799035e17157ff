"""JSON that every parser accepts: Python's ``json`` writes ``NaN``/``Infinity`` by default, which is not JSON.

A score or metric that is not a finite number (a zero-norm embedding's cosine, a loss that diverged) is written as
``null``: the document stays valid and the hole stays visible.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively through dicts/lists/tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        return finite_or_none(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none(obj) <finite_or_none>`, refusing NaN should one slip through."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
