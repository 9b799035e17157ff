"""What the Parzen protocol rewards, measured on one generator's validation split (the test split is never read).

    .venv/bin/python jobs/parzen_probe.py RUN_DIR [--model model-parzen] [--n 10000] [--noise 0.1 0.2 0.3 0.5]
                                          [--shrink 0.1 0.2] [--json FILE]

Each row below is a set of n window centres scored like ``jobs/parzen_select.py`` scores a checkpoint (the standard
sigma grid, the best sigma's mean log-density of the run's validation images):
  - ``training images``: n training images themselves (a model that memorised them);
  - ``decoded codes``: their reconstructions, i.e. what a prior matched perfectly to the encoder's codes would give;
  - ``decoded codes + noise s``: the codes moved by Gaussian noise of std s before decoding (how sharp the decoder
    is in code space, i.e. how it decodes the space between training codes where prior draws land);
  - ``decoded codes shrunk a``: the reconstructions moved a of the way to their mean image (blur, no model change);
  - ``samples``: the model's own samples, the protocol's seeded draws.
In code space it also reports, over the codes of every training image (what the prior is matched to), the median
distance from a code to its nearest other code, and from a draw of N(0, I) (the Gaussian prior of the AAE and the
VAE) to its nearest code.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def decoded(model, z: torch.Tensor) -> torch.Tensor:
    """Decode codes in thousands: (n, D) float64, the Parzen centres' layout."""
    return torch.cat([model.decode(z[i:i + 1000]).reshape(-1, model.input_dim) for i in range(0, len(z), 1000)]).double()


def nearest_distances(reference: np.ndarray, queries: np.ndarray, skip_self: bool) -> np.ndarray:
    """Euclidean distance from each query row to its nearest reference row (the second nearest when the queries are
    reference rows themselves)."""
    from sklearn.neighbors import NearestNeighbors

    d, _ = NearestNeighbors(n_neighbors=2 if skip_self else 1).fit(reference).kneighbors(queries)
    return d[:, -1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (run.yaml and the model directory below)")
    ap.add_argument("--model", default="model-parzen", help="model directory inside the run (default: the epoch "
                                                            "jobs/parzen_select.py chose)")
    ap.add_argument("--n", type=int, default=10000, help="window centres per row (the protocol's 10,000)")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--shrink", type=float, nargs="*", default=[0.1, 0.2])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from raeflow.config import RunConfig
    from raeflow.errors import InputError
    from raeflow.evaluate import PARZEN_SIGMAS, parzen_samples, parzen_scores, posterior_samples, seeded_rows
    from raeflow.io import load_model
    from raeflow.models import capabilities as cap
    from raeflow.train.run import in_memory_data

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    data = in_memory_data(RunConfig.from_yaml(run / "run.yaml"))
    model = load_model(run / args.model)
    missing = {cap.ENCODE, cap.RECONSTRUCT, cap.GENERATE} - cap.capabilities_of(model)
    if missing:
        raise InputError(f"{run / args.model}: the probe needs a model that encodes, decodes and samples; it lacks "
                         f"{sorted(missing)}")
    if data.val is None:
        raise InputError(f"{run}: the run has no validation split to score on")
    val = torch.from_numpy(data.val.x.reshape(len(data.val), -1)).double()  # (N_val, D)
    x = torch.from_numpy(data.train.x)
    with torch.no_grad():  # every training code once: the picked rows' below, and the code-space distances
        z = torch.cat([model.encode(x[i:i + 5000]) for i in range(0, len(x), 5000)])  # (N_train, k)
    picked = seeded_rows(len(x), args.n)  # the rows posterior_samples reconstructs
    codes = z[picked]  # (n, k)
    recon = posterior_samples(model, data.train.x, args.n)  # (n, D)
    g = torch.Generator().manual_seed(1)
    centres = {"training images": x[picked].reshape(len(picked), -1).double(), "decoded codes": recon}
    for s in args.noise:
        centres[f"decoded codes + noise {s}"] = decoded(model, codes + s * torch.randn(codes.shape, generator=g))
    for a in args.shrink:
        centres[f"decoded codes shrunk {a}"] = (1 - a) * recon + a * recon.mean(0, keepdim=True)
    centres["samples"] = parzen_samples(model, args.n)
    rows = []
    for name, c in centres.items():
        scores = parzen_scores(c, val)
        i = int(np.argmax(scores))
        rows.append({"centres": name, "val_log_likelihood": scores[i], "sigma": float(PARZEN_SIGMAS[i])})
        print(f"{name:>28}: {scores[i]:.1f} nats at sigma {PARZEN_SIGMAS[i]:.3f}", flush=True)
    z = z.numpy()
    prior = np.random.default_rng(2).standard_normal((min(5000, len(z)), z.shape[1])).astype(z.dtype)
    spacing = {"codes": len(z),
               "code_to_nearest_code_median": float(np.median(nearest_distances(z, z[:5000], skip_self=True))),
               "normal_draw_to_nearest_code_median": float(np.median(nearest_distances(z, prior, skip_self=False)))}
    print(f"code space: a training code lies {spacing['code_to_nearest_code_median']:.3f} from its nearest code, "
          f"an N(0, I) draw {spacing['normal_draw_to_nearest_code_median']:.3f} (medians)")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "model": args.model, "validation_images": len(val),
                                               "centres_per_row": args.n, "rows": rows, "code_space": spacing},
                                              indent=1))


if __name__ == "__main__":
    main()
