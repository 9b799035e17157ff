"""``raeflow bench train``: training throughput of Ray Train against a plain PyTorch loop, side by side.

Same model (``ae`` 784-1000-500-250-30), data (MNIST training split), batch size and total thread count for
every contender, measured in one process, one after the other:

* ``plain``: a minimal hand-written loop (zero_grad / forward / backward / step over shuffled in-memory
  batches), the honest baseline; run first and again last, so drift from other load on the machine shows;
* ``local``: raeflow's own :class:`~raeflow.train.loop.Trainer` in-process (``raeflow train --local``);
* ``ray-wN``: ``raeflow train --workers N`` on Ray Train (the same Trainer under DDP in N workers).

Throughput is steady-state: the first epoch is excluded (Ray start-up, worker start, data materialisation and
first-touch allocation are reported separately), and samples/s counts the training loop only (validation and
checkpointing are in each epoch's wall time, reported beside it). Achieved GFLOP/s counts the dense layers'
forward + backward work (6 x weights x samples) against this machine's measured peak ``torch.mm`` rate.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from raeflow.config import RunConfig
from raeflow.data import TrainingData, load_training_data
from raeflow.registry import build_model
from raeflow.errors import InputError

HIDDEN = [1000, 500, 250]
LATENT = 30


@dataclass
class Measurement:
    name: str
    threads: str  # per process, e.g. "2" or "2x1"
    samples_per_s: float  # steady state (mean over epochs 2..), training loop only
    best_samples_per_s: float  # the fastest steady epoch: the least disturbed by other load on the machine
    samples_per_cpu_s: float  # steady state: samples per CPU-second of the training loop, all processes summed
    epoch_s: float  # steady state: one epoch's training loop
    epoch_wall_s: float  # steady state: epoch start to next epoch start (+ validation, checkpoint, report)
    first_epoch_s: float
    startup_s: float | None = None  # from the call to the first training step (Ray: start, workers, data)
    details: dict[str, float] = field(default_factory=dict)


def dense_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def peak_matmul_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 ``torch.mm`` rate on ``n x n`` matrices with ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: allocation, thread pool
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


def _model(data: TrainingData, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("ae", input_shape=list(data.train.shape), latent_dim=LATENT, hidden=HIDDEN)


def plain_loop(data: TrainingData, epochs: int, batch_size: int, threads: int, seed: int = 0) -> Measurement:
    """The baseline: what anyone would write by hand, no framework."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(data, seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.from_numpy(data.train.x)
        n = len(x) // batch_size * batch_size
        times, cpus = [], []
        for epoch in range(epochs):
            t, c = time.perf_counter(), time.process_time()
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))[:n]
            model.train()
            for i in range(0, n, batch_size):
                xb = x[perm[i:i + batch_size]]
                opt.zero_grad(set_to_none=True)
                loss = model(xb)["loss"]
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        steady = times[1:] or times
        per = statistics.mean(steady)
        cpu = statistics.mean(cpus[1:] or cpus)
        return Measurement("plain PyTorch loop", str(threads), n / per, n / min(steady), n / cpu, per, per, times[0])
    finally:
        torch.set_num_threads(old)


def _from_rows(name: str, threads: str, rows: list[dict[str, Any]], call_time: float,
               end_time: float) -> Measurement:
    """Steady-state figures from a run's metrics rows (epoch 1 excluded)."""
    steady = rows[1:] or rows
    sps = statistics.mean(r["samples_per_s"] for r in steady)
    best = max(r["samples_per_s"] for r in steady)
    per_cpu = statistics.mean(r["samples_per_s"] * r["epoch_s"] / r["cpu_s"] for r in steady)
    ep = statistics.mean(r["epoch_s"] for r in steady)
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    wall = statistics.mean(walls) if walls else rows[0]["epoch_s"]
    first = rows[0]
    first_start = first["time"] - first["epoch_s"]  # approximately: the end of epoch 1 less its loop (and val)
    details = {"teardown_s": end_time - rows[-1]["time"]}
    startup = first.get("data_ready_time", first_start) - call_time
    if "worker_start_time" in first:
        details["workers_up_s"] = first["worker_start_time"] - call_time
        details["data_ready_s"] = first["data_ready_time"] - first["worker_start_time"]
    return Measurement(name, threads, sps, best, per_cpu, ep, wall, first["epoch_s"], startup, details)


def _cfg(out: Path, epochs: int, batch_size: int, workers: int, threads: int) -> RunConfig:
    cfg = RunConfig(variant="ae", model={"hidden": HIDDEN, "latent_dim": LATENT}, output=str(out))
    cfg.data.dataset = "mnist"
    cfg.train.epochs = epochs
    cfg.train.batch_size = batch_size
    cfg.train.threads = max(1, threads // workers)  # the same total thread count as the baseline
    cfg.train.checkpoint_every = epochs  # one checkpoint at the end: the bench measures training
    cfg.ray.workers = workers
    return cfg


def local_trainer(data: TrainingData, epochs: int, batch_size: int, threads: int, seed: int = 0) -> Measurement:
    """raeflow's Trainer in-process, fed as ``raeflow train --local`` feeds it (its checkpoint writing, outside
    the timed loop anyway, left out)."""
    from raeflow.train.loop import TensorBatches, Trainer, seed_everything

    cfg = _cfg(Path("unused"), epochs, batch_size, 1, threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        trainer = Trainer(_model(data, seed), cfg.train, log=lambda s: None)
        batches = TensorBatches(torch.from_numpy(data.train.x), None, batch_size, seed=seed)
        val = None
        if data.val is not None:
            val = TensorBatches(torch.from_numpy(data.val.x), None, max(batch_size, 512), shuffle=False,
                                drop_last=False)
        rows: list[dict[str, Any]] = []
        cpu = {"s": 0.0}

        def train_batches(epoch: int):
            batches.set_epoch(epoch)
            c0 = time.process_time()
            yield from batches
            cpu["s"] = time.process_time() - c0

        t = time.time()
        trainer.fit(train_batches, (lambda: val) if val is not None else None, len(batches),
                    lambda r: rows.append({**r.metrics, "epoch": r.epoch, "time": time.time(), "cpu_s": cpu["s"]}))
    finally:
        torch.set_num_threads(old)
    return _from_rows("raeflow Trainer (--local)", str(threads), rows, t, time.time())


def ray_train(data: TrainingData, epochs: int, batch_size: int, threads: int, workers: int, workdir: Path,
              seed: int = 0, log: Callable[[str], None] = print) -> Measurement:
    from raeflow.train.ray_engine import fit_ray
    from raeflow.train.rundir import RunDir

    cfg = _cfg(workdir / f"ray-w{workers}", epochs, batch_size, workers, threads)
    run = RunDir.create(cfg)
    t = time.time()
    fit_ray(cfg, _model(data, seed), data, run, False, log=lambda s: log(f"  {s}") if "error" in s else None)
    m = _from_rows(f"Ray Train --workers {workers}", f"{workers}x{cfg.train.threads}", run.read_metrics(), t,
                   time.time())
    return m


def run_bench(*, epochs: int = 3, limit: int | None = None, batch_size: int = 128, threads: int | None = None,
              workers: tuple[int, ...] = (1, 2), local: bool = True, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Measure every contender; returns the figures (and logs a table as it goes)."""
    from raeflow import raycluster

    if epochs < 2:
        raise InputError("--epochs must be at least 2: the first epoch is excluded from steady state")
    threads = threads or (os.cpu_count() or 1)
    data = load_training_data("mnist")
    epoch_rows = len(data.train)  # a full MNIST epoch, for the one-epoch figure
    ray_start = None
    if limit:
        data.train = data.train.subset(slice(0, min(limit, len(data.train))))
        if data.val is not None:
            data.val = data.val.subset(slice(0, min(len(data.val), max(512, limit // 10))))
    probe = _model(data, 0)
    flops_per_sample = 6 * dense_weights(probe)
    gpu = "GPU present, unused (CPU bench)" if torch.cuda.is_available() else "no GPU"
    log(f"machine: {os.cpu_count()} cores, {gpu}, torch {torch.__version__}; {threads} threads in total per "
        "contender")
    log(f"model: ae 784-{'-'.join(map(str, HIDDEN))}-{LATENT} ({sum(p.numel() for p in probe.parameters()):,} "
        f"parameters, {flops_per_sample / 1e6:.1f} MFLOP per training sample); data: MNIST train "
        f"{len(data.train):,} rows, val {0 if data.val is None else len(data.val):,}; batch {batch_size}; "
        f"{epochs} epochs (steady state = epochs 2..{epochs})")
    peak = peak_matmul_gflops(threads)
    log(f"peak torch.mm float32 ({threads} threads): {peak:.1f} GFLOP/s; load average "
        f"{os.getloadavg()[0]:.1f}")

    results: list[Measurement] = []

    def done(m: Measurement) -> None:
        results.append(m)
        log(f"{m.name:<28} {m.samples_per_s:>9,.0f} samples/s ({m.samples_per_cpu_s:,.0f} per CPU-s)  epoch "
            f"{m.epoch_s:6.2f}s (wall {m.epoch_wall_s:6.2f}s)"
            f"  {m.samples_per_s * flops_per_sample / 1e9:6.1f} GFLOP/s"
            + (f"  start-up {m.startup_s:5.1f}s" if m.startup_s is not None else "")
            + f"  [load {os.getloadavg()[0]:.1f}]")

    done(plain_loop(data, epochs, batch_size, threads))
    with tempfile.TemporaryDirectory(prefix="raeflow-bench-") as tmp:
        work = Path(tmp)
        if local:
            done(local_trainer(data, epochs, batch_size, threads))
        if workers:
            t = time.perf_counter()
            started = raycluster.ensure_ray(
                None, object_store_memory=raycluster.object_store_for(data.train.x.nbytes + (
                    0 if data.val is None else data.val.x.nbytes)), owner="raeflow.bench", log=lambda s: None)
            ray_start = time.perf_counter() - t
            log(f"ray.init: {ray_start:.1f}s" + ("" if started else " (already running)"))
            try:
                for w in workers:
                    done(ray_train(data, epochs, batch_size, threads, w, work, log=log))
            finally:
                raycluster.shutdown_if_started("raeflow.bench")
    again = plain_loop(data, epochs, batch_size, threads)
    again.name = "plain PyTorch loop (again)"
    done(again)

    # The baseline is the plain loop's two runs (first and last) together, so slow drift cancels.
    base = statistics.mean([results[0].samples_per_s, again.samples_per_s])
    base_best = max(results[0].best_samples_per_s, again.best_samples_per_s)
    log("")
    base_cpu = statistics.mean([results[0].samples_per_cpu_s, again.samples_per_cpu_s])
    log(f"{'contender':<28} {'threads':>7} {'samples/s':>10} {'vs plain':>9} {'best ep.':>9} {'vs plain':>9} "
        f"{'per CPU-s':>10} {'vs plain':>9} {'GFLOP/s':>8} {'% peak':>7} {'start-up s':>10}")
    for m in results:
        gf = m.best_samples_per_s * flops_per_sample / 1e9
        log(f"{m.name:<28} {m.threads:>7} {m.samples_per_s:>10,.0f} {m.samples_per_s / base:>9.2f} "
            f"{m.best_samples_per_s:>9,.0f} {m.best_samples_per_s / base_best:>9.2f} {m.samples_per_cpu_s:>10,.0f} "
            f"{m.samples_per_cpu_s / base_cpu:>9.2f} {gf:>8.1f} {100 * gf / peak:>6.0f}% "
            f"{'' if m.startup_s is None else f'{m.startup_s:.1f}':>10}")
    log("samples/s: mean of the steady epochs; best ep.: the fastest steady epoch (least disturbed by other load); "
        "per CPU-s: samples per CPU-second of the training loop, every worker process summed (the figure other "
        "load on a shared machine moves least); GFLOP/s from the best epoch; vs plain: against the plain loop's "
        "two runs together")
    full_epoch = epoch_rows / base
    log(f"\none MNIST epoch ({epoch_rows:,} rows, batch {batch_size}) of this model, plain loop: {full_epoch:.1f}s "
        f"(steady mean; {epoch_rows / base_best:.1f}s at the best epoch's rate)")
    return {"threads": threads, "peak_gflops": peak, "flops_per_sample": flops_per_sample, "ray_init_s": ray_start,
            "plain_samples_per_s": base, "plain_best_samples_per_s": base_best, "plain_samples_per_cpu_s": base_cpu,
            "mnist_epoch_s": full_epoch,
            "rows": len(data.train), "epochs": epochs, "batch_size": batch_size,
            "results": [asdict(m) for m in results]}
