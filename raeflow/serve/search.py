"""``POST /{model}/search``: the k nearest rows of an embeddings directory (``--index NAME=DIR``) to the queries.

The index is the directory's ANN index (:func:`raeflow.index.open_index`) when ``raeflow index`` built one,
else the embedding side's :class:`raeflow.embed.search.Index` (exact cosine search, in memory). This
module decides which served model may query which index: codes of different models are not comparable, so a
model searches an index only when the index was embedded by that very model (the sha256 that ``raeflow embed``
records) or, for an index that records none, when the code sizes agree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from raeflow.serve.errors import ServiceError
from raeflow.serve.service import ModelService
from raeflow.errors import InputError


@dataclass
class ServedIndex:
    name: str
    index: Any  # raeflow.index.AnnIndex or raeflow.embed.search.Index: same search(codes, k)
    models: list[str]  # served models whose codes live in this index's space


def load_indexes(specs: Sequence[dict[str, str]], services: dict[str, ModelService]) -> dict[str, ServedIndex]:
    """Load every ``{"name", "path"}``; give ``search`` to each model that matches at least one index."""
    if not specs:
        return {}
    from raeflow.embed.search import Index

    shas = {name: svc.artifact.sha256 for name, svc in services.items()}
    out: dict[str, ServedIndex] = {}
    from raeflow.index import open_index

    for spec in specs:
        # issue 13: the directory's ANN index when `raeflow index` built one (refused if it is another model's
        # or stale), else every embedding in memory for the exact search.
        index = open_index(spec["path"]) or Index.load(spec["path"])
        sha = index.model_sha256
        models = [n for n, svc in services.items()
                  if (shas.get(n) == sha if sha else svc.latent_dim == index.dim)]
        if not models:
            raise InputError(f"--index {spec['name']}={spec['path']}: no served model produced it (it was embedded "
                             f"by model sha256 {str(sha)[:12]}, {index.dim}-d codes); serve that model too")
        out[spec["name"]] = ServedIndex(spec["name"], index, models)
    for name, svc in services.items():
        svc.indexes = [s for s in out.values() if name in s.models]
        if svc.indexes:
            svc.search_fn = functools.partial(search_index, out, svc)
    return out


def search_index(indexes: dict[str, ServedIndex], svc: ModelService, codes: np.ndarray, k: int,
                 index: str | None) -> dict[str, Any]:
    """Codes (B, latent) of the request's inputs -> per query, the k nearest rows {id, score, label}."""
    svc.require("search")
    usable = sorted(n for n, s in indexes.items() if svc.name in s.models)
    if index is None:
        if len(usable) > 1:
            raise ServiceError(422, f"model {svc.name!r} can search several indexes ({', '.join(usable)}); name "
                                    "one with \"index\"")
        index = usable[0]
    elif index not in indexes:
        raise ServiceError(404, f"unknown index {index!r}; served indexes: {', '.join(sorted(indexes))}")
    elif index not in usable:
        raise ServiceError(422, f"index {index!r} holds codes of another model ({', '.join(indexes[index].models)}),"
                                f" not comparable with {svc.name!r}'s; {svc.name!r} can search: {', '.join(usable)}")
    served = indexes[index]
    hits = served.index.search(codes, k)
    return {"index": index, "rows": len(served.index), "k": min(k, len(served.index)),
            "results": [[h.to_dict() for h in row] for row in hits]}
