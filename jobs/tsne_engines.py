"""Which t-SNE engine raeflow uses: openTSNE against scikit-learn on 10,000 MNIST codes, same threads, same seed.

    .venv/bin/python jobs/tsne_engines.py [--threads 1] [--n 3000 10000]

Codes: an AE (784-256-32) trained one pass over 20k MNIST training images, encoding the first n test images; both engines get
the same PCA-50 input (here the 32-d code itself) and perplexity 30. Prints wall and CPU seconds per engine, the
load average (a shared machine's timings measure the neighbours too) and the 5-NN label accuracy of each 2-D map.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, nargs="+", default=[10000])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from raeflow.data.images import load_mnist
    from raeflow.models.ae import DenseAE  # noqa: F401  (registers the variant)
    from raeflow.registry import build_model

    tr, te = load_mnist("train"), load_mnist("test")
    torch.manual_seed(0)
    model = build_model("ae", input_shape=[1, 28, 28], hidden=[256], latent_dim=32)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.from_numpy(tr.x[:20000])
    for _ in range(1):
        for i in range(0, len(x) - 255, 256):
            opt.zero_grad()
            model(x[i:i + 256])["loss"].backward()
            opt.step()
    model.eval()
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from raeflow.projection import tsne_2d

    for n in a.n:
        with torch.no_grad():
            z = model.encode(torch.from_numpy(te.x[:n])).numpy()
        y = te.y[:n]
        print(f"codes {z.shape}, threads {a.threads}, load average {os.getloadavg()}", flush=True)
        for engine in ("opentsne", "sklearn", "opentsne"):  # openTSNE first and last: the load drifts
            w0, c0 = time.perf_counter(), time.process_time()
            xy = tsne_2d(z, seed=0, n_jobs=a.threads, engine=engine)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            acc = cross_val_score(KNeighborsClassifier(5), xy, y, cv=3).mean()
            print(f"n={n} {engine:9s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  5-NN accuracy {acc:.3f}  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
