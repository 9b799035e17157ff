"""Batch job: embed 20 Newsgroups documents with a trained document model (its saved vectoriser included).

Locally (starts a Ray instance in this process):

    raeflow train --variant ae --dataset 20newsgroups --set model.hidden=[500,250] -k 10 --epochs 50 -o runs/ae-20ng
    python jobs/embed_20newsgroups.py --model runs/ae-20ng --output runs/emb-20ng-test

On a cluster (`ray up cluster.yaml`; model and output on storage every node sees):

    export RAY_AUTH_MODE=token   # token authentication: the cluster's token in ~/.ray/auth_token (README)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/embed_20newsgroups.py --model /mnt/shared/ae-20ng --output /mnt/shared/emb-20ng

--input embeds your own documents instead (a folder of .txt files, a .jsonl file or Parquet with a text column).
Rows that cannot be embedded (empty, not UTF-8) are listed in OUTPUT/_errors and counted in the summary.
Then: `raeflow search --embeddings OUT --model MODEL --query "the space shuttle launch"`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run directory of a document model (with model/vectoriser.json)")
    ap.add_argument("--output", required=True, help="output directory (Parquet dataset)")
    ap.add_argument("--split", default="test", choices=["train", "test"], help="20 Newsgroups split (default: test)")
    ap.add_argument("--input", default=None, help="embed this instead: a .txt folder, .jsonl or Parquet with text")
    ap.add_argument("--text-column", default=None, help="text column / JSON field of --input (default 'text')")
    ap.add_argument("--id-column", default=None, help="id column / JSON field of --input (default 'id' if present)")
    ap.add_argument("--workers", type=int, default=None, help="encoder actors (default: GPUs with --gpu, else CPUs-1)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per encoder actor")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per encoder call (default 1024 CPU / 4096 GPU)")
    ap.add_argument("--resume", action="store_true", help="finish an interrupted job in --output")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local instance); "
                    "with token authentication, RAY_AUTH_MODE=token and the cluster's token (inside `ray job "
                    "submit` the job inherits both from its node)")
    args = ap.parse_args(argv)

    from raeflow.embed.job import run_embed  # imported after parsing: --help needs no Ray or torch

    run_embed(args.model, args.input or f"20newsgroups:{args.split}", args.output, workers=args.workers,
              gpu=args.gpu, batch_size=args.batch_size, text_column=args.text_column, id_column=args.id_column,
              resume=args.resume, address=args.address)
    return 0  # bad rows are accounted for in OUTPUT/_errors and the summary, not in the exit code


if __name__ == "__main__":
    sys.exit(main())
