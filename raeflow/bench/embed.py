"""``raeflow bench embed``: ``raeflow embed`` on Ray Data against a plain single-process loop, and its memory.

The corpus is MNIST's 60,000 training images repeated to ``rows`` rows, written by the bench to a temporary
Parquet file as ``image: fixed_size_list<uint8>[784]`` (the raw bytes: 784 B a row, the compact form a real
corpus of small images would have; the job divides by 255 as the data layer does) and ``label``; no id column,
so both sides number the rows. The model is the paper's dense 784-1000-500-250-30 AE with fixed random
weights (throughput does not depend on the weights) unless ``--model`` names a trained one.

* plain loop: ``pyarrow`` record batches -> ``Encoder.encode_array`` (torch, all cores) -> ``ParquetWriter``,
  in this process, no Ray: what one would write by hand;
* ``raeflow embed``: :func:`raeflow.embed.job.run_embed` on a freshly started Ray (its start-up is reported
  apart), so the figure is the job: planning, Ray Data's own actors, worker processes importing torch and loading
  the model, reading, encoding, committing files; then the same job again on the same Ray (workers and Ray Data's
  actors already up: a second job on a running cluster), reported beside it. Both report when the first encoded
  rows reached the driver.

Memory: the proportional set size (PSS, which splits shared pages such as Ray's object store fairly) of this
process and every process under it (Ray's GCS, raylet and workers when Ray is started here), sampled every
1 s; the peak during the job at ``--memory-rows`` (100k) and at ``rows`` shows whether memory grows with the
corpus. Process-tree accounting through psutil (PSS needs Linux's smaps; elsewhere it reads 0).
"""
from __future__ import annotations

import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from raeflow.errors import InputError

Log = Callable[[str], None]
MiB = 2**20


# ------------------------------------------------------------------------------------------ memory
def _tree(root: int) -> list["psutil.Process"]:
    """``root`` and its live descendants (psutil walks the process table: Linux /proc, macOS, Windows alike)."""
    import psutil

    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _title(proc) -> str:
    """A process's name as Ray sets it (``ray::MapWorker(...)``, ``raylet``...), or its command."""
    import psutil

    try:
        args = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not args:
        return "?"
    first = args[0]
    if first.startswith("ray::"):
        return first.split(" ")[0]
    return Path(first).name if not first.endswith("python") and "python" not in Path(first).name else \
        " ".join(args[1:3])


def tree_memory(root: int | None = None, by_process: bool = False) -> dict[str, Any]:
    """{"pss", "rss", "processes"} summed over ``root`` (default: this process) and all its descendants;
    with ``by_process``, also "by": title -> PSS bytes. PSS counts shared pages once across the tree (Ray
    workers share the object store and libraries), which RSS would count in every process."""
    import psutil

    root = root or os.getpid()
    procs = _tree(root)
    pss = rss = 0
    by: dict[str, int] = {}
    for p in procs:
        try:
            mem = p.memory_full_info()  # reads smaps: has pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # exited meanwhile
            continue
        share = getattr(mem, "pss", 0)  # Linux only
        pss += share
        rss += mem.rss
        if by_process:
            name = "this process" if p.pid == root else _title(p)
            by[name] = by.get(name, 0) + share
    out: dict[str, Any] = {"pss": pss, "rss": rss, "processes": len(procs)}
    if by_process:
        out["by"] = by
    return out


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system, including reaped children) of ``root`` and its descendants: what a side
    costs whatever else the machine runs (wall-clock rows/s on a shared machine also measures the neighbours)."""
    import psutil

    total = 0.0
    for p in _tree(root or os.getpid()):
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class MemorySampler:
    """Peak of :func:`tree_memory` while the ``with`` block runs.

    Sampling is not free: reading every process's smaps took 34 ms of CPU per sample over a Ray job's 10
    processes (measured here; ``/proc/PID/smaps_rollup`` was no cheaper), against a few ms for the plain loop's
    one process. At the former 0.2 s interval that was 17% of a core charged to the Ray side alone; at 1 s it is
    3%, and a job's memory plateaus over tens of seconds, so the peak is still seen."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.peak_pss = self.peak_rss = self.max_processes = 0
        self.peak_by: dict[str, int] = {}  # process title -> PSS MiB at the peak
        # CPU seconds per process as last seen: Ray's workers are not our children, so once they exit their CPU
        # time is in no rusage we can read; sampling keeps all but their last interval's.
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of this process and every descendant seen while the block ran (sampled)."""
        return sum(self._cpu.values())

    def _sample_cpu(self) -> None:
        import psutil

        for p in _tree(os.getpid()):
            try:
                t = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self._cpu[p.pid] = t.user + t.system

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample_cpu()
            m = tree_memory(by_process=True)
            if m["pss"] > self.peak_pss:
                self.peak_by = {k: round(v / MiB) for k, v in sorted(m["by"].items(), key=lambda kv: -kv[1])}
            self.peak_pss = max(self.peak_pss, m["pss"])
            self.peak_rss = max(self.peak_rss, m["rss"])
            self.max_processes = max(self.max_processes, m["processes"])
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._sample_cpu()  # the baseline, before the block starts anything
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_cpu()


# ------------------------------------------------------------------------------------------ inputs
def make_model(path: Path, seed: int = 0) -> Path:
    """The dense 784-1000-500-250-30 AE with seeded random weights, saved as a raeflow model directory."""
    import torch

    from raeflow.io import save_model
    from raeflow.registry import build_model

    torch.manual_seed(seed)
    model = build_model("ae", input_shape=[1, 28, 28], latent_dim=30, hidden=[1000, 500, 250]).eval()
    data = {"name": "mnist", "kind": "image", "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)],
            "preprocessing": {"pixels": "bytes/255"}}
    return save_model(model, path, data=data)


def make_corpus(path: Path, rows: int, row_group: int = 65536) -> Path:
    """MNIST's training images repeated to ``rows`` rows: ``image`` fixed_size_list<uint8>[784], ``label``."""
    from raeflow.data.images import load_mnist

    raw = load_mnist("train")
    pixels = np.rint(raw.x.reshape(len(raw.x), -1) * 255).astype(np.uint8)  # the original bytes
    labels = np.asarray(raw.classes)[raw.y]
    schema = pa.schema([("image", pa.list_(pa.uint8(), 784)), ("label", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        for s in range(0, rows, row_group):
            idx = np.arange(s, min(rows, s + row_group)) % len(pixels)
            img = pa.FixedSizeListArray.from_arrays(pa.array(pixels[idx].reshape(-1)), 784)
            w.write_table(pa.table({"image": img, "label": pa.array(labels[idx])}, schema=schema))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ the two sides
def plain_embed(corpus: Path, model: Path, out: Path, batch_size: int = 1024, threads: int | None = None) -> dict:
    """The hand-written loop: pyarrow batches -> torch encoder -> one Parquet file, one process."""
    from raeflow.embed.encoder import Encoder, dense_rows, to_vectors

    t0 = time.perf_counter()
    enc = Encoder(model, threads=threads or os.cpu_count())
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), enc.latent_dim)),
                        ("label", pa.string())])
    n = 0
    cpu0 = tree_cpu_seconds()
    with MemorySampler() as mem, pq.ParquetWriter(out, schema) as w:
        for rb in pq.ParquetFile(corpus).iter_batches(batch_size=batch_size, columns=["image", "label"]):
            x = dense_rows(rb.column(0), enc.input_dim)
            mu, _ = enc.encode_array(x)
            ids = pa.array([str(i) for i in range(n, n + len(x))])
            w.write_table(pa.table({"id": ids, "embedding": to_vectors(mu), "label": rb.column(1)}, schema=schema))
            n += len(x)
    wall = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    return {"rows": n, "wall_s": round(wall, 2), "rows_per_s": round(n / wall, 1), "cpu_s": round(cpu, 1),
            "rows_per_cpu_s": round(n / cpu, 1), "peak_pss_mib": round(mem.peak_pss / MiB),
            "peak_rss_mib": round(mem.peak_rss / MiB)}


def ray_embed(corpus: Path, model: Path, out: Path, batch_size: int | None, workers: int | None) -> dict:
    from raeflow.embed.job import run_embed

    idle = tree_memory()
    t0 = time.perf_counter()
    cpu0 = tree_cpu_seconds()
    with MemorySampler() as mem:
        s = run_embed(model, str(corpus), out, batch_size=batch_size, workers=workers, progress=False,
                      log=lambda _: None)
    wall = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    if s.embedded != s.rows_in or s.errors:
        raise RuntimeError(f"bench corpus gave {s.errors} error rows: {out}")
    return {"rows": s.rows_in, "wall_s": round(wall, 2), "rows_per_s": round(s.rows_in / wall, 1),
            "cpu_s": round(cpu, 1), "rows_per_cpu_s": round(s.rows_in / cpu, 1), "workers": s.workers,
            "batch_size": s.batch_size, "files": s.files, "first_row_s": s.first_row_s,
            "idle_pss_mib": round(idle["pss"] / MiB), "peak_pss_mib": round(mem.peak_pss / MiB),
            "peak_rss_mib": round(mem.peak_rss / MiB), "processes": mem.max_processes,
            "peak_by": dict(list(mem.peak_by.items())[:4])}


def bench_embed(rows: int = 1_000_000, *, memory_rows: int = 100_000, model: str | None = None,
                workdir: str | None = None, batch_size: int | None = None, workers: int | None = None,
                keep: bool = False, log: Log = print) -> dict[str, Any]:
    """Run both sides on the same corpus and model; returns every figure (see the module docstring)."""
    import shutil

    from raeflow.raycluster import ensure_ray, shutdown_if_started

    if rows < 1 or memory_rows < 1:
        raise InputError("--rows and --memory-rows must be at least 1")
    base = Path(workdir or tempfile.mkdtemp(prefix="raeflow-bench-embed-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        md = Path(model) if model else (base / "model" if (base / "model" / "config.json").is_file()
                                        else make_model(base / "model"))
        sizes = sorted({min(memory_rows, rows), rows})
        corpora = {}
        for n in sizes:
            t = time.perf_counter()
            path = base / f"mnist-x{n}.parquet"
            # A kept --workdir's corpus is reused when it is complete (it is renamed into place when written).
            corpora[n] = path if path.is_file() and pq.read_metadata(path).num_rows == n else make_corpus(path, n)
            log(f"corpus {n:,} rows: {corpora[n].stat().st_size / MiB:.0f} MiB Parquet in "
                f"{time.perf_counter() - t:.1f}s")
        def plain_side(which: str) -> dict:
            load = round(os.getloadavg()[0], 2)
            p = plain_embed(corpora[rows], md, base / "plain.parquet", batch_size or 1024)
            p["load_before"] = load
            log(f"plain loop ({which}), {rows:,} rows: {p['rows_per_s']:,.0f} rows/s, {p['rows_per_cpu_s']:,.0f} per "
                f"CPU-s, peak PSS {p['peak_pss_mib']} MiB [load {load}]")
            return p

        # The plain loop first and last: the ratio is against both, so drift in the machine's load cancels.
        plain = plain_side("first")
        runs, ray_start = {}, []
        for n in sizes:
            # A fresh local Ray per size, so both memory figures start from the same idle processes (Ray keeps
            # finished actors' and idle workers' processes for a while).
            t = time.perf_counter()
            ensure_ray(log=lambda _: None)
            ray_start.append(time.perf_counter() - t)
            shutil.rmtree(base / f"embed-{n}", ignore_errors=True)  # the bench's own output of an earlier run
            load = round(os.getloadavg()[0], 2)
            runs[n] = ray_embed(corpora[n], md, base / f"embed-{n}", batch_size, workers)
            runs[n]["load_before"] = load
            if n == rows:
                # The same job again in the same Ray session: its workers and Ray Data's session actors are up,
                # as for a second job on a running cluster or in a notebook. The cold run above is the headline.
                shutil.rmtree(base / "embed-warm", ignore_errors=True)
                load = round(os.getloadavg()[0], 2)
                warm = ray_embed(corpora[n], md, base / "embed-warm", batch_size, workers)
                warm["load_before"] = load
            shutdown_if_started()
            log(f"raeflow embed, {n:,} rows: {runs[n]['rows_per_s']:,.0f} rows/s, first rows after "
                f"{runs[n]['first_row_s']}s, peak PSS {runs[n]['peak_pss_mib']} MiB (Ray idle {runs[n]['idle_pss_mib']} "
                f"MiB); at the peak: {runs[n]['peak_by']}")
        plain_last = plain_side("last")
        ray_start = min(ray_start)
        big = runs[rows]
        plain_rate = (plain["rows_per_s"] + plain_last["rows_per_s"]) / 2
        plain_cpu_rate = (plain["rows_per_cpu_s"] + plain_last["rows_per_cpu_s"]) / 2
        return {"rows": rows, "memory_rows": sizes[0], "model": str(md), "corpus_bytes": corpora[rows].stat().st_size,
                "plain": plain, "plain_last": plain_last, "ray": {str(n): r for n, r in runs.items()},
                "ray_warm": warm, "ray_start_s": round(ray_start, 1),
                "ratio": round(big["rows_per_s"] / plain_rate, 3),
                "cpu_ratio": round(big["rows_per_cpu_s"] / plain_cpu_rate, 3),
                "warm_ratio": round(warm["rows_per_s"] / plain_rate, 3),
                "warm_cpu_ratio": round(warm["rows_per_cpu_s"] / plain_cpu_rate, 3),
                "memory_growth": round(big["peak_pss_mib"] / runs[sizes[0]]["peak_pss_mib"], 3),
                "machine": machine(), "workdir": str(base)}
    finally:
        if not keep and not workdir:
            shutil.rmtree(base, ignore_errors=True)


def machine() -> dict[str, Any]:
    import torch

    import ray

    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "loadavg_1m": round(load[0], 2)}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def markdown(r: dict[str, Any]) -> str:
    p = r["plain"]
    lines = [f"Corpus: {r['rows']:,} MNIST-sized images (uint8, {r['corpus_bytes'] / MiB:.0f} MiB Parquet); model "
             f"{r['model']}; {r['machine']['cpus']} CPUs ({r['machine']['cpu']}), load average at the end "
             f"{r['machine']['loadavg_1m']}; Ray start-up {r['ray_start_s']}s (not counted).", "",
             "| side | rows | rows/s | wall s | first rows s | CPU s | rows per CPU s | peak PSS MiB (idle) | processes "
             "| load before |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def plain_row(which: str, p: dict) -> str:
        return (f"| plain loop ({which}; 1 process) | {p['rows']:,} | {p['rows_per_s']:,.0f} | {p['wall_s']} | - | "
                f"{p['cpu_s']} | {p['rows_per_cpu_s']:,.0f} | {p['peak_pss_mib']} | 1 | {p.get('load_before', '-')} |")

    def ray_row(which: str, n: int, x: dict) -> str:
        return (f"| raeflow embed ({which}, {x['workers']} task(s), batch {x['batch_size']}) | {n:,} | "
                f"{x['rows_per_s']:,.0f} | {x['wall_s']} | {x.get('first_row_s', '-')} | {x['cpu_s']} | "
                f"{x['rows_per_cpu_s']:,.0f} | {x['peak_pss_mib']} ({x['idle_pss_mib']}) | {x['processes']} | "
                f"{x.get('load_before', '-')} |")

    lines.append(plain_row("first", p))
    for n, x in r["ray"].items():
        lines.append(ray_row("fresh Ray", int(n), x))
    if "ray_warm" in r:
        lines.append(ray_row("same Ray again", r["rows"], r["ray_warm"]))
    if "plain_last" in r:
        lines.append(plain_row("last", r["plain_last"]))
    lines += ["", f"raeflow embed / plain loop (mean of its runs): **{r['ratio']:.2f}x** rows/s (wall clock), **{r['cpu_ratio']:.2f}x** "
                  f"rows per CPU second; peak memory at {r['rows']:,} rows / at {r['memory_rows']:,} rows: "
                  f"**{r['memory_growth']:.2f}x**"]
    if "warm_ratio" in r:
        lines.append(f"The same job again in the same Ray session (workers and Ray Data's actors already up): "
                     f"**{r['warm_ratio']:.2f}x** wall, {r['warm_cpu_ratio']:.2f}x per CPU second.")
    return "\n".join(lines)
