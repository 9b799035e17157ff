"""Measure a pixelcnn or vqvae run for RESULTS.md, from its finished model or any epoch checkpoint.

    .venv/bin/python jobs/measure_autoregressive.py RUN_DIR [--epoch N] [--n-test 10000] [--parzen] [--json OUT]

What it measures, all on the MNIST test split, with one torch thread:
* pixelcnn: exact test NLL (nats per image) on the fixed seed-0 binarisation (``raeflow.evaluate.binarize``, the
  VAE rows' protocol), a 16-sample grid (PNG), ``sample(n)`` latency for n = 1 and 16.
* vqvae: squared reconstruction error per image (Hinton & Salakhutdinov's measure, as ``eval --task
  reconstruction``), codebook usage over the test codes (perplexity, codes used, dead), the prior's NLL of the
  test code grids, a 64-sample grid, ``sample(16)`` latency p50 over 5 draws, and with --parzen the AAE's
  Parzen protocol (``raeflow.evaluate.parzen``: 10k samples, sigma chosen on the last 1,000 training images).

It reads the model through its capabilities, never the variant name. A checkpoint gives the weights at the end of
that epoch (``checkpoints/epoch-NNNN/checkpoint.pt``); without --epoch it takes ``model/`` if training finished,
else the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from raeflow.config import RunConfig  # noqa: E402
from raeflow.data import load_eval_data  # noqa: E402
from raeflow.evaluate import binarize, parzen  # noqa: E402
from raeflow.io import load_model  # noqa: E402
from raeflow.models import capabilities as cap  # noqa: E402
from raeflow.models.vqvae import perplexity  # noqa: E402
from raeflow.registry import build_model  # noqa: E402
from raeflow.train.rundir import load_checkpoint  # noqa: E402


def load(run: Path, epoch: int | None):
    ckpts = sorted((run / "checkpoints").glob("epoch-*"))
    if epoch is None and (run / "model" / "config.json").is_file():
        return load_model(run / "model"), "model/"
    if epoch is not None:
        ckpts = [c for c in ckpts if c.name == f"epoch-{epoch:04d}"]
    if not ckpts:
        raise SystemExit(f"{run}: no model/ and no checkpoint{'' if epoch is None else f' for epoch {epoch}'}")
    cfg = RunConfig.from_yaml(run / "run.yaml")
    model = build_model(cfg.variant, **{**cfg.model, "input_shape": [1, 28, 28]})
    model.load_state_dict(load_checkpoint(ckpts[-1])["model"])
    return model.eval(), ckpts[-1].name


def grid_png(images: torch.Tensor, path: Path, cols: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * 29 + 1, cols * 29 + 1))
    for k, im in enumerate(images.reshape(n, 28, 28).numpy()):
        r, c = divmod(k, cols)
        canvas[1 + r * 29:1 + r * 29 + 28, 1 + c * 29:1 + c * 29 + 28] = im
    plt.imsave(path, canvas, cmap="gray_r", vmin=0, vmax=1)


def timed(fn, reps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each call. With one thread, CPU seconds are what the call costs on a quiet
    machine; wall seconds on a shared one also count the time other processes held the core."""
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--epoch", type=int)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--parzen", action="store_true")
    ap.add_argument("--no-samples", action="store_true", help="skip sampling (a vq-stage checkpoint: no prior yet)")
    ap.add_argument("--figures", type=Path, default=Path("docs/results"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model, source = load(a.run, a.epoch)
    caps = cap.capabilities_of(model)
    test = load_eval_data("mnist")
    x = test.x[: a.n_test]
    name = a.run.name
    out: dict = {"run": str(a.run), "weights": source, "n_test": len(x), "load_avg": list(np.round(
        __import__("os").getloadavg(), 1))}
    if cap.LIKELIHOOD in caps:  # the fixed seed-0 binarisation of the VAE rows
        xb = torch.from_numpy(binarize(x, 0))
        ll = torch.cat([model.log_likelihood(xb[i:i + 500]) for i in range(0, len(xb), 500)]).double()
        out["nll_fixed_binarisation"] = float(-ll.mean())
        out["nll_std_error"] = float(ll.std() / math.sqrt(len(ll)))
    if cap.RECONSTRUCT in caps:
        xt = torch.from_numpy(x)
        rec = torch.cat([model.reconstruct(xt[i:i + 500]) for i in range(0, len(xt), 500)])
        out["squared_error_per_image"] = float(((rec - xt) ** 2).flatten(1).sum(1).double().mean())
        # two rows: 16 test digits, their reconstructions
        grid_png(torch.cat([xt[:16], rec[:16]]), a.figures / f"{name}-reconstructions.png", 16)
    if cap.DISCRETE_CODES in caps:
        xt = torch.from_numpy(x)
        idx = torch.cat([model.encode_indices(xt[i:i + 500]) for i in range(0, len(xt), 500)])
        k = int(model.codebook_size)
        used = int(idx.unique().numel())
        out["codebook"] = {"size": k, "perplexity": float(perplexity(idx, k)), "codes_used": used,
                           "dead_codes": k - used, "grid": list(idx.shape[1:])}
        if hasattr(model, "prior_log_prob"):
            lp = torch.cat([model.prior_log_prob(idx[i:i + 500]) for i in range(0, len(idx), 500)]).double()
            out["prior_nll_codes"] = float(-lp.mean())
    if cap.GENERATE in caps and not a.no_samples:
        g = torch.Generator().manual_seed(0)
        n_grid = 16 if cap.AUTOREGRESSIVE in caps and cap.ENCODE not in caps else 64
        samples = model.sample(n_grid, generator=g)
        grid_png(samples, a.figures / f"{name}-samples.png", 8 if n_grid == 64 else 8)
        lat = {}
        for n, reps in ((1, 3), (16, 5 if cap.ENCODE in caps else 2)):
            ts, cs = timed(lambda: model.sample(n, generator=torch.Generator().manual_seed(1)), reps)
            lat[f"n{n}"] = {"p50_s": statistics.median(ts), "p50_cpu_s": statistics.median(cs),
                            "all_s": [round(t, 3) for t in ts], "all_cpu_s": [round(c, 3) for c in cs]}
        out["sample_latency_1_thread"] = lat
        if a.parzen:
            train = load_eval_data("mnist:train")
            res = parzen(model, test, train, {})
            out["parzen"] = {k: v for k, v in res.items() if k != "sigma_grid"}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
