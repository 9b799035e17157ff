"""`raeflow eval --task reconstruction` on a checkpoint of a run that is still training (no ``model/`` yet).

    .venv/bin/python jobs/eval_checkpoint.py RUN_DIR [--checkpoint best|latest|epoch-NNNN] [--splits test train]

Builds the model from the run's ``run.yaml`` exactly as training did, loads the checkpoint's weights and prints one
JSON line per split: Hinton & Salakhutdinov's squared error per image (``raeflow.evaluate.reconstruction``), with
the epoch the checkpoint holds. ``best`` is the checkpoint selected by validation loss so far: what ``model/`` will
hold when the run ends, if no later epoch beats it.
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (run.yaml, checkpoints/)")
    ap.add_argument("--checkpoint", default="best", help="best | latest | epoch-NNNN (default best)")
    ap.add_argument("--splits", nargs="+", default=["test"], help="splits to measure (default: test)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from raeflow.config import RunConfig
    from raeflow.data import load_eval_data
    from raeflow.evaluate import reconstruction
    from raeflow.train.rundir import load_checkpoint
    from raeflow.train.run import untrained_model

    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_yaml(f"{args.run}/run.yaml")
    model, data = untrained_model(cfg)
    state = load_checkpoint(f"{args.run}/checkpoints/{args.checkpoint}")
    model.load_state_dict(state["model"])
    model.eval()
    epoch = state.get("epoch", state.get("progress", {}).get("epoch"))
    for split in args.splits:
        d = load_eval_data(f"{cfg.data.dataset}:{split}", data.vectoriser)
        print(json.dumps({"run": args.run, "checkpoint": args.checkpoint, "epoch": epoch, "split": split,
                          **reconstruction(model, d, None, {})}))


if __name__ == "__main__":
    main()
