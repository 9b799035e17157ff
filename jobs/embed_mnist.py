"""Batch job: embed the MNIST test set (or any built-in image split) with a trained model.

Locally (starts a Ray instance in this process):

    raeflow train --variant ae --dataset mnist --epochs 10 -o runs/ae-mnist
    python jobs/embed_mnist.py --model runs/ae-mnist --output runs/emb-mnist-test

On a cluster (`ray up cluster.yaml`; model and output on storage every node sees):

    export RAY_AUTH_MODE=token   # token authentication: the cluster's token in ~/.ray/auth_token (README)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/embed_mnist.py --model /mnt/shared/ae-mnist --output /mnt/shared/emb-mnist --gpu

Inside `ray job submit` the job joins the cluster (RAY_ADDRESS is set for it, and RAY_AUTH_MODE and the token
come from the node it runs on; tests/test_multinode.py submits it to a two-node cluster with token auth on). Re-running with --resume after
an interruption finishes the job without duplicates. The output is a Parquet dataset (id `mnist:test:<i>`,
embedding, label); search it with `raeflow search --embeddings OUT --model MODEL --query mnist:test:0`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run directory of a model trained on MNIST (28x28 grey)")
    ap.add_argument("--output", required=True, help="output directory (Parquet dataset)")
    ap.add_argument("--split", default="test", choices=["train", "test"], help="MNIST split (default: test)")
    ap.add_argument("--dataset", default="mnist", help="built-in image dataset (default mnist; fashion-mnist too)")
    ap.add_argument("--workers", type=int, default=None, help="encoder actors (default: GPUs with --gpu, else CPUs-1)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per encoder actor")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per encoder call (default 1024 CPU / 4096 GPU)")
    ap.add_argument("--resume", action="store_true", help="finish an interrupted job in --output")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local instance); "
                    "with token authentication, RAY_AUTH_MODE=token and the cluster's token (inside `ray job "
                    "submit` the job inherits both from its node)")
    args = ap.parse_args(argv)

    from raeflow.embed.job import run_embed  # imported after parsing: --help needs no Ray or torch

    run_embed(args.model, f"{args.dataset}:{args.split}", args.output, workers=args.workers, gpu=args.gpu,
              batch_size=args.batch_size, resume=args.resume, address=args.address)
    return 0  # bad rows are accounted for in OUTPUT/_errors and the summary, not in the exit code


if __name__ == "__main__":
    sys.exit(main())
