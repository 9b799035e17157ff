"""``raeflow bench stream``: streamed training against the in-memory (materialised) path, and its memory at scale.

On a generated corpus (``raeflow corpus``: distinct MNIST-derived images as uint8 Parquet), one epoch of the dense
AE on Ray Train, each side a ``raeflow.train.run.train`` call in a new Python process with its own local Ray:

* at ``--rows`` (default 200,000): the materialised path (``data.read=memory``: the driver reads the corpus and
  puts it into Ray's object store) first, the streamed path (``data.read=stream``), the materialised path again
  -- samples/s of each (the trainer's own figure: training rows over the training loop's wall time, which holds a
  streamed epoch's pipeline start-up; Ray's and the workers' start-up and validation are outside it) and the
  ratio streamed / mean(materialised), per wall second and per CPU-second;
* at ``--large-rows`` (default 2,000,000): the streamed path alone.

``--memory-only`` runs the streamed sides only (no ratio is printed without the plain side measured first and
last).

Memory is the peak PSS of this process and all its descendants (the driver, Ray's GCS, raylet, Train and Data
workers), sampled every 0.2 s: PSS counts pages shared between them (the object store, libraries) once. The
corpus is written before any timing and reused across runs (``--workdir``).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from raeflow.bench.embed import MemorySampler

MiB = 2**20


@dataclass
class Side:
    name: str
    rows: int
    samples_per_s: float
    epoch_s: float
    wall_s: float
    cpu_s: float
    peak_pss_mib: int
    peak_by: dict[str, int]


def corpus(workdir: Path, rows: int, log: Callable[[str], None]) -> Path:
    from raeflow.data.corpus import write_corpus

    out = workdir / f"corpus-{rows}"
    if out.is_dir() and any(out.glob("part-*.parquet")):
        return out
    t0 = time.perf_counter()
    write_corpus(out, rows, log=lambda s: None)
    log(f"corpus: {rows:,} rows written to {out} in {time.perf_counter() - t0:.0f}s")
    return out


def one_epoch(name: str, data: Path, read: str, rows: int, workdir: Path, *, workers: int, batch_size: int,
              log: Callable[[str], None]) -> Side:
    from raeflow.config import RunConfig
    from raeflow.train.run import train

    cfg = RunConfig(variant="ae", output=str(workdir / f"run-{name}-{rows}-{int(time.time())}"))
    cfg.data.dataset, cfg.data.read = str(data), read
    cfg.train.epochs, cfg.train.batch_size = 1, batch_size
    cfg.ray.workers = workers
    t0 = time.perf_counter()
    # 0.2 s: memory is this bench's goal, and both sides are Ray runs of the same processes, so the sampler's
    # own CPU (MemorySampler's docstring) weighs on both alike.
    with MemorySampler(interval=0.2) as mem:
        c0 = mem.cpu_seconds
        train(cfg, log=lambda s: None)
    wall, cpu = time.perf_counter() - t0, mem.cpu_seconds - c0  # every process of the side, Ray's included
    from raeflow.train.rundir import RunDir

    row = RunDir(cfg.output).read_metrics()[-1]
    side = Side(name, rows, float(row["samples_per_s"]), float(row["epoch_s"]), wall, cpu,
                round(mem.peak_pss / MiB), mem.peak_by)
    log(f"{name:>13} {rows:>10,} rows: {side.samples_per_s:>8,.0f} samples/s (epoch {side.epoch_s:.1f}s, wall "
        f"{wall:.0f}s, {cpu:.0f} CPU-s), peak PSS {side.peak_pss_mib:,} MiB")
    return side


def fresh_epoch(name: str, data: Path, read: str, rows: int, workdir: Path, *, workers: int, batch_size: int,
                log: Callable[[str], None]) -> Side:
    """:func:`one_epoch` in a new Python process: each side's peak memory is its own, not what an earlier side
    left in this process's heap (a materialised side leaves its driver at ~1.5 GB PSS on 200,000 rows)."""
    import json
    import subprocess
    import sys

    code = (f"import json, dataclasses; from pathlib import Path; from raeflow.bench.stream import one_epoch; "
            f"s = one_epoch({name!r}, Path({str(data)!r}), {read!r}, {rows}, Path({str(workdir)!r}), "
            f"workers={workers}, batch_size={batch_size}, log=lambda m: None); "
            f"print('SIDE ' + json.dumps(dataclasses.asdict(s)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("SIDE ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"bench side {name} ({rows:,} rows) failed:\n{r.stderr[-3000:]}")
    side = Side(**json.loads(line[5:]))
    log(f"{name:>13} {rows:>10,} rows: {side.samples_per_s:>8,.0f} samples/s (epoch {side.epoch_s:.1f}s, wall "
        f"{side.wall_s:.0f}s, {side.cpu_s:.0f} CPU-s), peak PSS {side.peak_pss_mib:,} MiB")
    return side


def run_bench(rows: int = 200_000, large_rows: int | None = 2_000_000, workers: int = 1, batch_size: int = 512,
              workdir: Path = Path("runs/bench-stream"), memory_only: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """``memory_only``: the streamed sides alone (memory at scale); no samples/s ratio without the plain side."""
    workdir.mkdir(parents=True, exist_ok=True)
    small = corpus(workdir, rows, log)
    large = corpus(workdir, large_rows, log) if large_rows else None
    load0 = os.getloadavg()[0]
    kw = {"workers": workers, "batch_size": batch_size, "log": log}
    mat1 = None if memory_only else fresh_epoch("materialised", small, "memory", rows, workdir, **kw)
    st = fresh_epoch("streamed", small, "stream", rows, workdir, **kw)
    mat2 = None if memory_only else fresh_epoch("materialised", small, "memory", rows, workdir, **kw)
    big = fresh_epoch("streamed", large, "stream", large_rows, workdir, **kw) if large else None
    load1 = os.getloadavg()[0]
    out = {"rows": rows, "large_rows": large_rows, "workers": workers, "batch_size": batch_size,
           "load_before": round(load0, 2), "load_after": round(load1, 2),
           "sides": [asdict(s) for s in (mat1, st, mat2, big) if s is not None]}
    if mat1 is not None and mat2 is not None:  # a ratio only with the plain side measured first and last
        mat = (mat1.samples_per_s + mat2.samples_per_s) / 2
        out["streamed_over_materialised"] = round(st.samples_per_s / mat, 3)
        out["streamed_per_cpu_s_over_materialised"] = round(
            (rows / st.cpu_s) / (2 * rows / (mat1.cpu_s + mat2.cpu_s)), 3)
        log(f"streamed / materialised samples/s at {rows:,} rows: {out['streamed_over_materialised']:.2f}x, per "
            f"CPU-s {out['streamed_per_cpu_s_over_materialised']:.2f}x (materialised {mat1.samples_per_s:,.0f} "
            f"first, {mat2.samples_per_s:,.0f} last; load {load0:.2f} -> {load1:.2f})")
    if big is not None:
        out["large_peak_over_small_peak"] = round(big.peak_pss_mib / st.peak_pss_mib, 3)
        log(f"streamed peak PSS: {big.peak_pss_mib:,} MiB at {large_rows:,} rows vs {st.peak_pss_mib:,} MiB at "
            f"{rows:,}: {out['large_peak_over_small_peak']:.2f}x")
    return out
