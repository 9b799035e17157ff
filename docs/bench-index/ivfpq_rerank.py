import json, time, numpy as np, faiss
from pathlib import Path
from threadpoolctl import threadpool_limits
faiss.omp_set_num_threads(1)
from raeflow.bench.index import load_vectors, encode_queries, recall, time_single, time_batch, _load
from raeflow.embed.search import top_k
from raeflow.index import open_index
out = Path("out/emb-1m")
rows = []
with threadpool_limits(1):
    base = load_vectors(out)
    q = encode_queries("runs/dae32-eco", "mnist:test", 300)
    truth = top_k(q, base, 10)[0]  # the exact search, as in the bench (300 queries)
    del base
    ix = open_index(out, min_rows=0)
    for nprobe, rr in [(8, 30), (16, 30), (16, 50), (32, 50)]:
        ix.set_params(nprobe=nprobe, rerank=rr)
        r = {"nprobe": nprobe, "rerank": rr, "recall": round(recall(ix.top_k(q, 10)[0], truth), 4),
             "single": time_single(lambda x: ix.top_k(x, 10), q, 5, 300), "batch": time_batch(lambda x: ix.top_k(x, 10), q)}
        print(r, flush=True); rows.append(r)
Path("out/bench-index-1m-ivfpq-rerank.json").write_text(json.dumps(rows, indent=2))
