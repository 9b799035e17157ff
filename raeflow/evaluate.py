"""``raeflow eval``: the literature's measures, computed on a held-out split with a saved model.

Each task is a function ``(model, data, train, opts) -> dict`` registered in :data:`TASKS` with the capabilities
it needs (``raeflow.models.capabilities``) and what it needs of the data (labels, images); ``evaluate`` runs the
ones asked for (default: all that apply) and returns one JSON-able dict. Whether a task applies is decided by
what the model declares, never by its variant name. Everything here is plain PyTorch / scikit-learn (no Ray).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raeflow.artifact import TrainedModel
from raeflow.data import ArrayDataset, known_datasets, load_eval_data, parse_spec
from raeflow.models import capabilities as cap
from raeflow.models.capabilities import capabilities_of
from raeflow.errors import InputError
from raeflow.io import model_dir
from raeflow.modelcard import write_model_card
from raeflow.tracking import eval_figures, log_to_run


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([fn(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


# ------------------------------------------------------------------------------------------------ tasks
def reconstruction(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """Hinton & Salakhutdinov 2006's measure: squared error summed over pixels, averaged over test images
    (pixels = bytes/255); plus per-pixel MSE and BCE. A word-count model (``multinomial`` loss: counts in, a word
    distribution out) is scored as a language model instead: see :func:`_document_reconstruction`."""
    rec = _batched(model.reconstruct, data.x).reshape(len(data), -1).astype(np.float64)
    x = data.x.reshape(len(data), -1).astype(np.float64)
    if model.loss_kind == "multinomial":
        return _document_reconstruction(rec, x)
    sq = ((rec - x) ** 2).sum(1)
    p = np.clip(rec, 1e-7, 1 - 1e-7)
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).mean()
    return {"squared_error_per_image": float(sq.mean()), "mse_per_pixel": float(sq.mean() / x.shape[1]),
            "bce_per_pixel": float(bce), "n": len(data)}


def _document_reconstruction(dist: np.ndarray, counts: np.ndarray) -> dict:
    """Counts (N, V) against the reconstructed word distributions (N, V): the training loss (cross-entropy of each
    document's word distribution, nats, averaged over documents with a word) and the per-word perplexity of the
    test words, exp(total negative log-likelihood / total words). Squared error between counts and a distribution
    would compare different things."""
    nll = -(counts * np.log(np.clip(dist, 1e-12, None))).sum(1)  # (N,) nats per document
    words = counts.sum(1)  # (N,)
    has = words > 0
    return {"cross_entropy_per_document": float((nll[has] / words[has]).mean()),
            "perplexity_per_word": float(np.exp(nll.sum() / words.sum())), "words": int(words.sum()),
            "n": len(counts)}


def probe(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """Code quality: logistic regression and k-NN fitted on frozen training codes, scored on test codes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    limit = int(opts.get("probe_train", 20000))  # the probe is a measurement, not a second training run
    ztr = _batched(model.encode, train.x[:limit])
    zte = _batched(model.encode, data.x)
    ytr, yte = train.y[:limit], data.y
    scaler = StandardScaler().fit(ztr)
    lr = LogisticRegression(max_iter=2000).fit(scaler.transform(ztr), ytr)
    knn = KNeighborsClassifier(n_neighbors=int(opts.get("knn_k", 5))).fit(ztr, ytr)
    return {"linear_probe_accuracy": float(lr.score(scaler.transform(zte), yte)),
            "knn_accuracy": float(knn.score(zte, yte)), "knn_k": int(opts.get("knn_k", 5)),
            "train_codes": len(ztr), "code_dim": int(ztr.shape[1])}


def classify(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """Test classification error of a model with a supervised head (fine-tuned classifier, SDAE)."""
    logits = _batched(model.predict, data.x)
    err = float((logits.argmax(1) != data.y).mean())
    return {"test_error": err, "test_error_percent": 100 * err, "n": len(data)}


def binarize(x: np.ndarray, seed: int) -> np.ndarray:
    """One fixed stochastic binarisation (x ~ Bernoulli(pixel)) drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.from_numpy(x), generator=g).numpy()


def likelihood(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """VAE: test ELBO and importance-weighted NLL (nats per image) on binarised test images.

    ``fixed``: one binarisation drawn with seed 0 and kept (pythae's reference protocol);
    ``dynamic``: a fresh binarisation per importance-sampling pass, averaged (Burda et al.'s protocol).
    """
    k = int(opts.get("k", 200))
    n = int(opts.get("likelihood_n", len(data)))
    x = data.x[:n]
    which = opts.get("binarisation", "both")
    protocols = {"fixed": [0], "dynamic": [1, 2, 3]}
    if which != "both":
        if which not in protocols:
            raise InputError(f"binarisation must be fixed, dynamic or both; got {which!r}")
        protocols = {which: protocols[which]}
    out: dict[str, Any] = {"k": k, "n": n, "unit": "nats per image"}
    if cap.POSTERIOR not in capabilities_of(model):
        # No latent variable to sample: log_likelihood is exact (an autoregressive model's sum over pixels), so
        # one pass per binarisation is the NLL and there is no bound to report beside it.
        out["k"], out["exact"] = 1, True
        for proto, seeds in protocols.items():
            nll = [_batched(lambda t: model.log_likelihood(t, 1).neg(), binarize(x, s), 250).mean() for s in seeds]
            out[proto] = {"nll": float(np.mean(nll))}
        return out
    for proto, seeds in protocols.items():
        nll, elbo = [], []
        for s in seeds:
            xb = binarize(x, s)
            torch.manual_seed(s)
            nll.append(_batched(lambda t: model.log_likelihood(t, k).neg(), xb, 250).mean())
            torch.manual_seed(s)
            elbo.append(_batched(lambda t: model.log_likelihood(t, 1), xb, 500).mean())
        out[proto] = {"nll": float(np.mean(nll)), "elbo": float(np.mean(elbo))}
    if model.loss_kind == "bce":  # the loss Keras-style VAEs report: BCE on grey-level pixels + KL, per image
        torch.manual_seed(0)
        out["grey"] = {"bce_plus_kl": float(-_batched(lambda t: model.log_likelihood(t, 1), x, 500).mean())}
    return out


def _parzen_distances(samples: torch.Tensor, x: torch.Tensor, chunk: int):
    """Squared distances of ``x`` (N, D) to ``samples`` (M, D), ``chunk`` rows of x at a time: (b, M) each."""
    s2 = (samples ** 2).sum(1)  # (M,)
    for i in range(0, len(x), chunk):
        xi = x[i:i + chunk]
        yield (xi ** 2).sum(1, keepdim=True) - 2 * xi @ samples.T + s2


def _parzen_log_density(d2: torch.Tensor, sigma: float, m: int, d: int) -> torch.Tensor:
    """(b, M) squared distances -> (b,) log-densities under the window of width ``sigma`` on M centres in D dims."""
    return torch.logsumexp(-d2 / (2 * sigma ** 2), 1) - math.log(m) - d / 2 * math.log(2 * math.pi * sigma ** 2)


def parzen_log_likelihood(samples: torch.Tensor, x: torch.Tensor, sigma: float, chunk: int = 500) -> torch.Tensor:
    """Log-density of each row of ``x`` (N, D) under an isotropic Gaussian Parzen window on ``samples`` (M, D): (N,)."""
    m, d = samples.shape
    return torch.cat([_parzen_log_density(d2, sigma, m, d) for d2 in _parzen_distances(samples, x, chunk)])


#: Goodfellow's ``parzen_ll.py`` (the script behind the GAN paper's 225 and the protocol the AAE paper's 340 follows):
#: sigma is chosen from this grid on 1,000 held-out training images, then the 10,000 test images are scored.
PARZEN_SIGMAS = np.logspace(-1, 0, 10)
PARZEN_HELD_OUT = 1000


def parzen_scores(samples: torch.Tensor, x: torch.Tensor, sigmas=PARZEN_SIGMAS, chunk: int = 500) -> list[float]:
    """Mean log-density of ``x`` (N, D) under the Parzen window on ``samples`` (M, D) for each sigma: one pass over
    the (N, M) squared distances serves every sigma (they dominate the cost; choosing sigma needs them once)."""
    m, d = samples.shape
    totals = np.zeros(len(sigmas))
    for d2 in _parzen_distances(samples, x, chunk):
        for j, sigma in enumerate(sigmas):
            totals[j] += float(_parzen_log_density(d2, sigma, m, d).sum())
    return [float(t / len(x)) for t in totals]


def parzen_fit(centres: torch.Tensor, held_out: torch.Tensor, test: torch.Tensor) -> dict:
    """Choose sigma from :data:`PARZEN_SIGMAS` by the held-out mean log-density, then score ``test`` with it."""
    scores = parzen_scores(centres, held_out)
    i = int(np.argmax(scores))
    ll = parzen_log_likelihood(centres, test, float(PARZEN_SIGMAS[i]))
    # A sigma at either end of the grid means the grid, not the data, chose it: the figure is then not the protocol's.
    return {"log_likelihood": float(ll.mean()), "std_error": float(ll.std() / math.sqrt(len(ll))),
            "sigma": float(PARZEN_SIGMAS[i]), "sigma_at_grid_edge": i in (0, len(PARZEN_SIGMAS) - 1),
            "held_out_scores": scores}


def kmeans_centres(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` k-means centres of ``x`` (N, D): the baseline Theis, van den Oord & Bethge (2016) put beside Parzen
    scores: centres that are not samples of any model beat most models' samples (measured here: 339.5 on MNIST,
    RESULTS.md). Lloyd's algorithm from ``n`` distinct random rows (k-means++ seeding of 10,000 centres would cost more
    than the whole fit)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(n, len(x)), init="random", n_init=1, max_iter=20, random_state=seed)
    return km.fit(x.astype(np.float32)).cluster_centers_


@torch.no_grad()
def parzen_samples(model, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples of ``model`` as a (n, D) float64 matrix, drawn in thousands from a seeded generator: the same
    draws whoever asks (the protocol's evaluation, or an epoch chosen on validation before it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([model.sample(min(1000, n - i), generator=g).reshape(-1, model.input_dim)
                      for i in range(0, n, 1000)]).double()


def seeded_rows(total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n, total)`` of ``total`` rows drawn without replacement from a seeded generator: the
    same rows whoever asks."""
    return np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))


@torch.no_grad()
def posterior_samples(model, x: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    """The reconstructions (decoded codes) of the :func:`seeded_rows` of ``x``: (n, D) float64, like
    ``parzen_samples``; the Parzen centres a prior matched perfectly to the encoder's codes would give.
    ``model.reconstruct``, not decode(encode()): a variant's own path back (a conv-AE's unpooling needs its
    encoder's indices)."""
    rows = torch.from_numpy(x[seeded_rows(len(x), n, seed)])
    return torch.cat([model.reconstruct(rows[i:i + 1000]).reshape(-1, model.input_dim)
                      for i in range(0, len(rows), 1000)]).double()


def parzen(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """The standard Parzen protocol (:data:`PARZEN_SIGMAS`): ``parzen_samples`` (10,000) samples of the model as the
    window's centres, sigma chosen on the last 1,000 training images (held out from training by the built-in
    datasets' validation split), mean log-density of the test images (nats; higher is better) ± std/√N.
    ``parzen_baseline`` (default on): the same protocol with k-means centres of the other training images in
    place of samples — Parzen scores are unreliable, and this says how much a score means."""
    n_samples = int(opts.get("parzen_samples", 10000))
    samples = parzen_samples(model, n_samples)
    rows = train.x.reshape(len(train.x), -1)
    held_out = torch.from_numpy(rows[-PARZEN_HELD_OUT:]).double()
    test = torch.from_numpy(data.x.reshape(len(data), -1)).double()
    out = {**parzen_fit(samples, held_out, test), "samples": n_samples, "held_out": len(held_out),
           "sigma_grid": [float(s) for s in PARZEN_SIGMAS]}
    if opts.get("parzen_baseline", True):
        centres = kmeans_centres(rows[:-PARZEN_HELD_OUT], n_samples)
        out["kmeans_baseline"] = {**parzen_fit(torch.from_numpy(centres).double(), held_out, test),
                                  "centres": len(centres)}
    return out


def denoise(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """PSNR (dB, peak 1) and squared error per image of the noisy and the denoised images against the clean."""
    from raeflow.models.corruption import Corruption

    n = int(opts.get("denoise_n", 2000))
    clean = torch.from_numpy(data.x[:n])
    rows = []
    for kind, levels in (("gaussian", (0.1, 0.3, 0.5)), ("masking", (0.25, 0.5)), ("salt_and_pepper", (0.1, 0.25))):
        for level in levels:
            noisy = Corruption(kind, level)(clean, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                den = model.denoise(noisy)
            row = {"noise": kind, "level": level}
            for name, img in (("noisy", noisy), ("denoised", den)):
                mse = ((img - clean) ** 2).flatten(1).mean(1)
                row[f"{name}_psnr"] = float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())
                row[f"{name}_sq_error"] = float(mse.mean() * model.input_dim)
            rows.append(row)
    return {"rows": rows, "n": n}


def retrieval(model, data: ArrayDataset, train: ArrayDataset | None, opts: dict) -> dict:
    """Documents: precision at recall levels vs LSA; images: precision@10 in code vs pixel vs PCA space."""
    from raeflow.embed.retrieval import default_plot_path, format_table, plot_retrieval
    from raeflow.embed.retrieval import retrieval as run_retrieval

    extra = {"test": data} if data.split == "test" else {}  # reuse the split evaluate() has loaded
    if extra and train is not None and train.split == "train" and data.x.ndim > 2:
        extra["train"] = train
    res = run_retrieval(opts["artifact"], opts["dataset"], **extra)
    res["plot"] = str(plot_retrieval(res, default_plot_path(opts["artifact"].path, res)))
    res["table"] = format_table(res)
    return res


@dataclass(frozen=True)
class Task:
    fn: Callable[..., dict]
    needs: frozenset[str]  # capabilities the model must declare
    labels: bool = False  # needs a labelled split
    images: bool = False  # needs image inputs
    needs_train: bool = False  # fits something on the training split (probes, Parzen's sigma)
    builtin_only: bool = False  # measured against baselines prepared for the built-in corpora only
    #: run only when asked for (``--task``) on models with any of these capabilities (Parzen's 10,000 samples
    #: drawn one pixel at a time would take hours on a CPU)
    not_by_default: frozenset[str] = frozenset()

    def applies(self, capabilities: frozenset[str], is_image: bool, labelled: bool) -> bool:
        return self.needs <= capabilities and (is_image or not self.images) and (labelled or not self.labels)

    def by_default(self, capabilities: frozenset[str], is_image: bool, labelled: bool) -> bool:
        return self.applies(capabilities, is_image, labelled) and not (self.not_by_default & capabilities)


TASKS: dict[str, Task] = {
    "reconstruction": Task(reconstruction, frozenset({cap.RECONSTRUCT})),
    "probe": Task(probe, frozenset({cap.ENCODE}), labels=True, needs_train=True),
    "classify": Task(classify, frozenset({cap.CLASSIFY}), labels=True),
    "likelihood": Task(likelihood, frozenset({cap.LIKELIHOOD}), images=True),
    "parzen": Task(parzen, frozenset({cap.GENERATE}), images=True, needs_train=True,
                   not_by_default=frozenset({cap.AUTOREGRESSIVE})),
    "denoise": Task(denoise, frozenset({cap.DENOISE}), images=True),
    "retrieval": Task(retrieval, frozenset({cap.ENCODE}), labels=True, builtin_only=True),
}


def tasks_for(capabilities: frozenset[str], is_image: bool = True, labelled: bool = True) -> list[str]:
    """The tasks ``raeflow eval`` runs by default on a model with these capabilities (the README's table is
    generated from this); ``--task`` may also ask for one that applies but is not run by default."""
    return [n for n, t in TASKS.items() if t.by_default(capabilities, is_image, labelled)]


def evaluate(model_path: "str | Path | TrainedModel", dataset: str | None = None, tasks: list[str] | None = None,
             opts: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Run ``tasks`` (default: every task that applies) on the test split of ``dataset`` (default: the
    dataset the model was trained on) and return the results, keyed by task."""
    opts = dict(opts or {})
    art = TrainedModel.load(model_path)
    dataset = dataset or art.data.get("name")
    if not dataset:
        raise InputError("the model's config.json names no dataset: pass --dataset")
    unknown = set(tasks or []) - set(TASKS)
    if unknown:
        raise InputError(f"unknown task(s) {sorted(unknown)}; known: {sorted(TASKS)}")
    model = art.model
    data = load_eval_data(dataset, vectoriser=art.vectoriser)
    if tuple(data.shape) != tuple(art.input.shape):
        raise InputError(f"{dataset} has examples of shape {data.shape}; the model takes {list(art.input.shape)}")
    is_image, labelled = art.input.is_image, data.y is not None
    chosen = tasks or tasks_for(art.capabilities, is_image, labelled)
    builtin = parse_spec(dataset)[0] in known_datasets()
    if not builtin:
        # Decided before any task runs: a task that cannot run on user data must not fail after the others
        # have run (their results would be lost with it).
        if tasks:
            bad = [n for n in chosen if TASKS[n].builtin_only]
            if bad:
                raise InputError(f"task(s) {bad} run on the built-in datasets only ({', '.join(sorted(known_datasets()))});"
                                 f" {dataset!r} is user data")
        chosen = [n for n in chosen if not TASKS[n].builtin_only]
    for name in chosen:
        if not TASKS[name].applies(art.capabilities, is_image, labelled):
            t = TASKS[name]
            raise InputError(f"task {name!r} does not apply to this {art.variant} model on {dataset}: it needs "
                             f"capabilities {sorted(t.needs)} (the model declares {sorted(art.capabilities)})"
                             + (", labelled data" if t.labels else "") + (", image inputs" if t.images else ""))
    train = None
    if any(TASKS[n].needs_train for n in chosen):
        # Probes and Parzen's sigma are fitted on the training split, preprocessed by the model's own
        # vectoriser (never refitted); user data has no split, so it serves as its own.
        name, _ = parse_spec(dataset)
        train = load_eval_data(f"{name}:train", vectoriser=art.vectoriser) if name in known_datasets() else data
    opts.update(artifact=art, dataset=dataset)
    results: dict[str, Any] = {"model": str(art.path), "variant": art.variant, "dataset": dataset,
                               "split": data.split, "tasks": {}}
    for name in chosen:
        t0 = time.perf_counter()
        log(f"eval {name} ...")
        results["tasks"][name] = {**TASKS[name].fn(model, data, train, opts),
                                  "seconds": round(time.perf_counter() - t0, 1)}
    return results


def to_markdown(results: dict) -> str:
    lines = [f"# eval: {results['variant']} on {results['dataset']} ({results['split']})", "",
             f"model: `{results['model']}`", ""]
    for name, res in results["tasks"].items():
        lines += [f"## {name}", ""]
        if "rows" in res and isinstance(res["rows"], list) and res["rows"] and isinstance(res["rows"][0], dict):
            keys = list(res["rows"][0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in res["rows"]]
        if "table" in res:
            lines += ["```", res["table"], "```"]
        for k, v in res.items():
            if k == "table":
                continue
            if k != "rows" and not isinstance(v, (list, dict)):
                lines.append(f"- {k}: {_fmt(v)}")
            elif isinstance(v, dict):
                lines.append(f"- {k}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in v.items() if not isinstance(b, list)))
        lines.append("")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def save_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = results["dataset"].replace(":", "-").replace("/", "_")
    j, m = d / f"eval-{stem}.json", d / f"eval-{stem}.md"
    j.write_text(json.dumps(results, indent=2))
    m.write_text(to_markdown(results))
    return j, m


def evaluate_run(model_path: "str | Path", dataset: str | None = None, tasks: list[str] | None = None,
                 opts: dict | None = None, output: str | Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[dict, tuple[Path, Path]]:
    """``raeflow eval``'s whole job, for the CLI and for ``raeflow tune --evaluate``: :func:`evaluate`, save
    ``eval-*.json``/``.md`` (default ``RUN_DIR/eval``) and, where ``model_path`` is a run directory, log the
    figures to its trackers and rewrite its model card so the card never lags the figures."""
    res = evaluate(model_path, dataset, tasks, opts, log=log)
    run_dir = model_dir(model_path).parent
    out = Path(output) if output is not None else run_dir / "eval"
    paths = save_results(res, out)
    if (run_dir / "run.yaml").is_file():
        log_to_run(run_dir, eval_figures(res), {"eval": out}, log=log)
        write_model_card(run_dir)
    return res, paths
