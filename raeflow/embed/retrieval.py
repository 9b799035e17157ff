"""Retrieval quality of a model's codes: the applications of Hinton & Salakhutdinov (2006), measured.

* :func:`document_retrieval` — every test document queries the rest of the test set by cosine similarity of
  codes; precision at recall levels 0.001 ... 1.0 (the paper's Fig. 4), where recall is the fraction of the
  query's same-class documents retrieved, averaged over queries. Baseline: LSA — TruncatedSVD of TF-IDF, fitted
  on the training split, with as many dimensions as the code — and, for reference, the model's own input
  vectors (its vocabulary-sized word vectors).
* :func:`image_retrieval` — similar-image search: precision@k (default 10) of same-label neighbours by cosine
  similarity in code space vs raw pixel space vs PCA (as many components as the code, fitted on train).

Both are exact (every query against every other test item) and return plain dicts (``--json``);
:func:`format_table` prints them side by side and :func:`plot_retrieval` draws them. No Ray here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from raeflow.artifact import TrainedModel
from raeflow.embed.search import MAX_BLOCK, normalise, top_k
from raeflow.errors import InputError

#: Recall levels of the precision-recall curve (the paper's Fig. 4 spans 0.001 to 1 on a log axis).
RECALL_LEVELS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)


def precision_at_recall(codes: np.ndarray, labels: np.ndarray,
                        levels: Sequence[float] = RECALL_LEVELS) -> tuple[np.ndarray, int]:
    """Mean precision at each recall level over leave-one-out queries; returns (precisions, queries used).

    For a query with R relevant items (same label, itself excluded) and level r, precision is m / n where m =
    max(1, ceil(r * R)) and n is the rank at which the m-th relevant item is retrieved. Queries with no
    relevant item are skipped (their recall is undefined).
    """
    v = normalise(codes)
    labels = np.asarray(labels)
    n = len(v)
    levels = np.asarray(levels, np.float64)
    total = np.zeros(len(levels))
    used = 0
    step = max(1, MAX_BLOCK // max(n, 1) // 4)  # argsort needs int64 indices as well: a quarter of the block
    for s in range(0, n, step):
        sims = v[s:s + step] @ v.T
        rows = np.arange(len(sims))
        sims[rows, s + rows] = -np.inf  # a query does not retrieve itself
        order = np.argsort(-sims, axis=1, kind="stable")
        relevant = labels[order] == labels[s:s + step, None]
        relevant[:, -1] = False  # the last rank is the query itself (-inf)
        for row in relevant:
            ranks = np.flatnonzero(row) + 1
            r_count = len(ranks)
            if r_count == 0:
                continue
            m = np.maximum(1, np.ceil(levels * r_count - 1e-9).astype(np.int64))
            total += m / ranks[m - 1]
            used += 1
    return total / max(used, 1), used


def precision_at_k(codes: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each item's k nearest others (cosine) that share its label."""
    v = normalise(codes)
    labels = np.asarray(labels)
    idx, _ = top_k(v, v, k, exclude=np.arange(len(v)))
    return float((labels[idx] == labels[:, None]).mean())


def _encode(art: TrainedModel, x: np.ndarray) -> np.ndarray:
    from raeflow.embed.encoder import Encoder

    return Encoder(art).encode_array(x)[0]


def _model_info(art: TrainedModel) -> dict[str, Any]:
    return {"dir": str(art.path), "variant": art.variant, "latent_dim": art.latent_dim,
            "model_sha256": art.sha256}


def document_retrieval(model: "str | os.PathLike | TrainedModel", dataset: str = "20newsgroups", *,
                       levels: Sequence[float] = RECALL_LEVELS, lsa_dim: int | None = None, baselines: bool = True,
                       test: Any = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Precision at recall levels for the model's codes vs LSA on the test split of ``dataset``.
    ``test``: that split already loaded through the model's vectoriser (``raeflow eval`` has it), else loaded here."""
    from sklearn.decomposition import TruncatedSVD

    from raeflow.data import load_eval_data
    from raeflow.data.catalog import known_datasets, parse_spec
    from raeflow.data.text import Vectoriser

    art = TrainedModel.load(model)
    name, split = parse_spec(dataset)
    split = split or "test"
    ds = known_datasets().get(name)
    if ds is None or ds.kind != "text":
        raise InputError(f"document retrieval needs a built-in document dataset (20newsgroups, reuters-r8, "
                         f"reuters-r52), got {dataset!r}")
    vec = art.vectoriser
    if vec is None:
        raise InputError(f"{art.path} has no vectoriser.json: it is not a document model")
    t0 = time.perf_counter()
    test = test if test is not None else load_eval_data(f"{name}:{split}", vec)
    if test.y is None:
        raise InputError(f"{name}:{split} has no labels: retrieval precision needs classes")
    codes = _encode(art, test.x)
    dim = lsa_dim or art.latent_dim
    methods: dict[str, dict[str, Any]] = {}
    p, used = precision_at_recall(codes, test.y, levels)
    methods[art.variant] = {"dim": art.latent_dim, "precision": p.tolist(), "what": "the model's codes"}
    log(f"{art.variant}: {used} queries, {time.perf_counter() - t0:.1f}s")
    if baselines:
        train_docs = ds.load("train").x
        tfidf = Vectoriser(vocab_size=vec.vocab_size, weighting="tfidf").fit(train_docs)
        svd = TruncatedSVD(n_components=dim, random_state=0).fit(tfidf.transform(train_docs))
        lsa = svd.transform(tfidf.transform(ds.load(split).x))
        methods["lsa"] = {"dim": dim, "precision": precision_at_recall(lsa, test.y, levels)[0].tolist(),
                          "what": f"TruncatedSVD({dim}) of TF-IDF over the {vec.vocab_size} most frequent stems, "
                                  f"fitted on {name}:train ({len(train_docs):,} docs)"}
        methods["input"] = {"dim": int(test.x.shape[1]),
                            "precision": precision_at_recall(test.x, test.y, levels)[0].tolist(),
                            "what": f"the model's input vectors ({vec.weighting} weighting)"}
        log(f"baselines done, {time.perf_counter() - t0:.1f}s")
    return {"task": "retrieval", "kind": "documents", "dataset": f"{name}:{split}", "queries": used,
            "items": len(test), "similarity": "cosine", "levels": list(levels), "model": _model_info(art),
            "methods": methods, "seconds": round(time.perf_counter() - t0, 1)}


def image_retrieval(model: "str | os.PathLike | TrainedModel", dataset: str = "mnist", *, k: int = 10, pca_dim: int | None = None,
                    baselines: bool = True, test: Any = None, train: Any = None,
                    log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """precision@k of same-label neighbours in code space vs pixel space vs PCA on the test split.
    ``test`` / ``train``: those splits when the caller has them loaded already (``raeflow eval``)."""
    from sklearn.decomposition import PCA

    from raeflow.data import load_eval_data
    from raeflow.data.catalog import known_datasets, parse_spec

    art = TrainedModel.load(model)
    name, split = parse_spec(dataset)
    split = split or "test"
    ds = known_datasets().get(name)
    if ds is None or ds.kind != "image":
        raise InputError(f"image retrieval needs a built-in image dataset (mnist, fashion-mnist, digits), "
                         f"got {dataset!r}")
    t0 = time.perf_counter()
    test = test if test is not None else load_eval_data(f"{name}:{split}")
    if test.y is None:
        raise InputError(f"{name}:{split} has no labels")
    codes = _encode(art, test.x)
    # PCA of the same size as the code, but never more components than pixels (a conv AE's 3,136-d feature map
    # on 784-pixel MNIST): then the baseline is all of pixel space's directions.
    dim = min(pca_dim or art.latent_dim, int(np.prod(test.x.shape[1:])))
    methods = {art.variant: {"dim": art.latent_dim, "precision_at_k": precision_at_k(codes, test.y, k),
                             "what": "the model's codes"}}
    if baselines:
        pixels = test.x.reshape(len(test), -1)
        train = (train if train is not None else load_eval_data(f"{name}:train")).x
        pca = PCA(n_components=dim, random_state=0).fit(train.reshape(len(train), -1))
        methods["pixels"] = {"dim": int(pixels.shape[1]), "precision_at_k": precision_at_k(pixels, test.y, k),
                             "what": "raw pixels in [0, 1]"}
        methods["pca"] = {"dim": dim, "precision_at_k": precision_at_k(pca.transform(pixels), test.y, k),
                          "what": f"PCA({dim}) fitted on {name}:train ({len(train):,} images)"}
    log(f"image retrieval done, {time.perf_counter() - t0:.1f}s")
    return {"task": "retrieval", "kind": "images", "dataset": f"{name}:{split}", "queries": len(test), "k": k,
            "similarity": "cosine", "model": _model_info(art), "methods": methods,
            "seconds": round(time.perf_counter() - t0, 1)}


def retrieval(model: "str | os.PathLike | TrainedModel", dataset: str, **kwargs: Any) -> dict[str, Any]:
    """Document or image retrieval, by the dataset's kind."""
    from raeflow.data.catalog import known_datasets, parse_spec

    name, _ = parse_spec(dataset)
    ds = known_datasets().get(name)
    if ds is None:
        raise InputError(f"retrieval is measured on built-in datasets ({', '.join(sorted(known_datasets()))}); "
                         f"got {dataset!r}")
    return (document_retrieval if ds.kind == "text" else image_retrieval)(model, dataset, **kwargs)


# ------------------------------------------------------------------------------------- reporting
def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: methods side by side (documents: one row per recall level)."""
    methods = result["methods"]
    names = list(methods)
    head = "| " + " | ".join(f"{n} ({methods[n]['dim']}-d)" for n in names) + " |"
    what = "document" if result["kind"] == "documents" else "image"
    lines = [f"{what} retrieval on {result['dataset']}: {result['queries']:,} queries, cosine similarity, "
             f"model {result['model']['variant']} {result['model']['dir']}", ""]
    if result["kind"] == "documents":
        lines += ["precision at recall level (mean over queries):", "", "| recall " + head,
                  "|---:" + "|---:" * len(names) + "|"]
        for i, level in enumerate(result["levels"]):
            lines.append(f"| {level:g} | " + " | ".join(f"{methods[n]['precision'][i]:.3f}" for n in names) + " |")
    else:
        lines += [f"precision@{result['k']} of same-label neighbours (mean over queries):", "", head,
                  "|" + "---:|" * len(names),
                  "| " + " | ".join(f"{methods[n]['precision_at_k']:.4f}" for n in names) + " |"]
    lines += [""] + [f"- {n}: {m['what']}" for n, m in methods.items()]
    return "\n".join(lines)


def plot_retrieval(result: dict[str, Any], path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    methods = result["methods"]
    if result["kind"] == "documents":
        for name, m in methods.items():
            ax.plot(result["levels"], m["precision"], marker="o", label=f"{name} ({m['dim']}-d)")
        ax.set_xscale("log")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, max(0.05, 1.05 * max(max(m["precision"]) for m in methods.values())))
        ax.legend()
        ax.grid(True, which="both", lw=0.3)
        ax.set_title(f"{result['dataset']}: precision-recall, cosine similarity")
    else:
        names = list(methods)
        vals = [methods[n]["precision_at_k"] for n in names]
        bars = ax.bar([f"{n}\n({methods[n]['dim']}-d)" for n in names], vals, color=["C0", "C7", "C1"][:len(names)])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"precision@{result['k']}")
        ax.set_title(f"{result['dataset']}: same-label neighbours, cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_plot_path(model_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    """``RUN_DIR/plots/retrieval-<dataset>.png`` for a run directory, else beside the model."""
    from raeflow.io import model_dir as resolve

    md = resolve(model_dir)
    base = md.parent / "plots" if md.name == "model" else md
    return base / f"retrieval-{result['dataset'].replace(':', '-')}.png"
