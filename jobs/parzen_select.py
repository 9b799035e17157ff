"""Choose a generator's epoch by its Parzen score on the validation split, then hand that epoch to `raeflow eval`.

    .venv/bin/python jobs/parzen_select.py RUN_DIR [--samples 10000] [--json FILE] [--bar SCORE] [--posterior N]

A run selects its kept epoch by the variant's ``selection_metric`` (the AAE's: validation reconstruction), which
is not what the Parzen protocol rewards. This script scores every checkpoint the run kept (``epoch-NNNN``; train
with ``--set train.checkpoint_every=5 --set train.keep_checkpoints=10`` to keep them) the way the protocol would,
but on the validation split instead of the test split: the same seeded samples ``raeflow eval --task parzen``
draws, the standard sigma grid, the best sigma's mean log-density of the validation images (held out from
training). The best checkpoint's model is written to ``RUN_DIR/model-parzen``; measure it once with
``raeflow eval --model RUN_DIR/model-parzen --task parzen``. The test split is never read here.

``--bar SCORE`` is a recipe's declared rule: the choice is written either way, but the exit status is 3 unless the
chosen epoch's validation score beats SCORE, so a script measures the test split only when it does.
``--posterior N`` also scores, at each checkpoint, the decoded codes of N training images: the samples a prior
matched perfectly to the encoder's codes would give. Its gap to the prior samples' score is what the mismatch
between codes and prior costs; the score itself is the ceiling of that decoder under the protocol.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: Exit status when the chosen epoch does not beat --bar (errors exit 1).
BELOW_BAR = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (run.yaml, checkpoints/epoch-NNNN)")
    ap.add_argument("--samples", type=int, default=10000, help="samples per checkpoint (the protocol's 10,000)")
    ap.add_argument("--json", help="write the per-epoch scores and the choice here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bar", type=float, help=f"exit with status {BELOW_BAR} unless the chosen epoch's validation "
                                              "score beats this (a recipe's declared rule)")
    ap.add_argument("--posterior", type=int, default=0, metavar="N",
                    help="also score the decoded codes of N training images at each checkpoint (needs reconstruct)")
    args = ap.parse_args()

    from raeflow.config import RunConfig
    from raeflow.errors import InputError
    from raeflow.evaluate import PARZEN_SIGMAS, parzen_samples, parzen_scores, posterior_samples
    from raeflow.io import save_model
    from raeflow.models import capabilities as cap
    from raeflow.train.rundir import load_checkpoint
    from raeflow.train.run import untrained_model

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = RunConfig.from_yaml(run / "run.yaml")
    model, data = untrained_model(cfg)
    if data.val is None:
        raise InputError(f"{run}: the run has no validation split to choose an epoch on")
    if cap.GENERATE not in model.capabilities:
        raise InputError(f"{run}: a {cfg.variant} does not generate, so it has no Parzen score")
    if args.posterior and cap.RECONSTRUCT not in model.capabilities:
        raise InputError(f"{run}: a {cfg.variant} does not reconstruct, so --posterior has no codes to decode")
    val = torch.from_numpy(data.val.x.reshape(len(data.val), -1)).double()  # (N_val, D)
    kept = sorted(run.glob("checkpoints/epoch-*"))
    if not kept:
        raise InputError(f"{run}: no checkpoints/epoch-* kept (train with train.keep_checkpoints >= the epochs / "
                         "train.checkpoint_every)")
    rows = []
    for ckpt in kept:
        t0 = time.perf_counter()
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        model.eval()
        scores = parzen_scores(parzen_samples(model, args.samples), val)
        i = int(np.argmax(scores))
        row = {"checkpoint": ckpt.name, "epoch": state["progress"]["epoch"], "val_log_likelihood": scores[i],
               "sigma": float(PARZEN_SIGMAS[i]), "sigma_at_grid_edge": i in (0, len(PARZEN_SIGMAS) - 1)}
        note = ""
        if args.posterior:
            post = parzen_scores(posterior_samples(model, data.train.x, args.posterior), val)
            j = int(np.argmax(post))
            row.update(posterior_val_log_likelihood=post[j], posterior_sigma=float(PARZEN_SIGMAS[j]))
            note = f"; decoded training codes {post[j]:.1f} at sigma {PARZEN_SIGMAS[j]:.3f}"
        rows.append(row)
        print(f"{ckpt.name}: validation Parzen {scores[i]:.1f} nats at sigma {PARZEN_SIGMAS[i]:.3f}{note} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    best = max(rows, key=lambda r: r["val_log_likelihood"])
    model.load_state_dict(load_checkpoint(run / "checkpoints" / best["checkpoint"])["model"])
    model.eval()
    save_model(model, run / "model-parzen", data=data.train.meta())
    print(f"chosen on validation: {best['checkpoint']} ({best['val_log_likelihood']:.1f}); model written to "
          f"{run / 'model-parzen'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "validation_images": len(val), "samples": args.samples,
                                               "posterior_samples": args.posterior, "bar": args.bar,
                                               "epochs": rows, "chosen": best}, indent=1))
    if args.bar is not None:
        beats = best["val_log_likelihood"] > args.bar
        print(f"validation {best['val_log_likelihood']:.1f} {'beats' if beats else 'does not beat'} {args.bar}: the test "
              f"split is {'to be' if beats else 'not'} measured")
        if not beats:
            sys.exit(BELOW_BAR)


if __name__ == "__main__":
    main()
