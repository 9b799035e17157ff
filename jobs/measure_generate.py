"""Time ``POST /{model}/generate`` on a running raeflow server, as a client sees it (RESULTS.md's /generate row).

    raeflow serve -m RUN_DIR [-m RUN_DIR2] --port 8123 --detach     # one replica, one CPU, so one torch thread
    .venv/bin/python jobs/measure_generate.py --url http://127.0.0.1:8123 --model NAME --n 16 --reps 10 [--json OUT]
    raeflow serve --stop --port 8123

Each request draws ``n`` samples with its own seed (``seed = i``: the answers are reproducible); the first
request is a warm-up, reported apart. Latency is the client's wall clock from sending the request to reading the
whole answer, so it includes HTTP, JSON encoding of the images and the replica's queue (empty here: one
request at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    url = f"{a.url.rstrip('/')}/{a.model}/generate"
    times, shapes = [], set()
    for i in range(a.reps + 1):
        t = time.perf_counter()
        ans = post(url, {"n": a.n, "seed": i})
        times.append(time.perf_counter() - t)
        assert ans["seed"] == i, ans.get("seed")
        shapes.add((len(ans["images"]), len(ans["images"][0])))
    again = post(url, {"n": a.n, "seed": 1})  # the same seed, the same images
    out = {"model": a.model, "n": a.n, "reps": a.reps, "warmup_s": round(times[0], 3),
           "p50_s": round(statistics.median(times[1:]), 3), "max_s": round(max(times[1:]), 3),
           "all_s": [round(t, 3) for t in times[1:]], "images": sorted(shapes),
           "seed_reproducible": again["images"] == post(url, {"n": a.n, "seed": 1})["images"],
           "load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
