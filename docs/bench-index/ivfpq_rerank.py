"""IVF-PQ recall and speed with longer re-ranked shortlists, on an embeddings directory whose _index is IVF-PQ.

    python docs/bench-index/ivfpq_rerank.py EMBEDDINGS MODEL OUT.json NPROBE:RERANK ...
    python docs/bench-index/ivfpq_rerank.py out/emb-1m runs/dae32-eco out/bench-index-1m-ivfpq-rerank.json 8:30 16:30 16:50 32:50

Truth is the exact search over the same unit vectors (300 held-out MNIST test queries), as in `raeflow bench index`;
one thread throughout.
"""
import json
import sys
from pathlib import Path

import faiss
from threadpoolctl import threadpool_limits

from raeflow.bench.index import encode_queries, load_vectors, recall, time_batch, time_single
from raeflow.embed.search import top_k
from raeflow.index import open_index

faiss.omp_set_num_threads(1)
out, model, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
settings = [tuple(int(v) for v in s.split(":")) for s in sys.argv[4:]] or [(8, 30), (16, 30), (16, 50), (32, 50)]
rows = []
with threadpool_limits(1):
    base = load_vectors(out)
    q = encode_queries(model, "mnist:test", 300)
    truth = top_k(q, base, 10)[0]  # the exact search, as in the bench
    del base
    ix = open_index(out, min_rows=0)
    for nprobe, rr in settings:
        ix.set_params(nprobe=nprobe, rerank=rr)
        r = {"nprobe": nprobe, "rerank": rr, "recall": round(recall(ix.top_k(q, 10)[0], truth), 4),
             "single": time_single(lambda x: ix.top_k(x, 10), q, 5, 300), "batch": time_batch(lambda x: ix.top_k(x, 10), q)}
        print(r, flush=True)
        rows.append(r)
dest.write_text(json.dumps(rows, indent=2))
