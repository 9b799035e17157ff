#!/usr/bin/env python
"""Serialising a /denoise answer (16 MNIST images as nested lists, 6 decimals): json.dumps (before) vs orjson."""
import json, time, os
import numpy as np, orjson
rng = np.random.default_rng(0)
out = {"images": np.round(rng.random((16, 28, 28)), 6).tolist()}
def t(f, n=300):
    f(); c = time.process_time()
    for _ in range(n): f()
    return (time.process_time() - c) / n * 1e3
for _ in range(2):
    a = t(lambda: json.dumps(out, separators=(",", ":")))
    b = t(lambda: orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY))
    print(f"json.dumps {a:.3f} ms CPU, orjson {b:.3f} ms CPU per 16-image answer ({len(orjson.dumps(out))/1e3:.0f} kB); load {os.getloadavg()[0]:.1f}")
