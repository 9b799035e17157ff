"""What both engines print and record per epoch (plain: the in-process run and every Ray Train worker use it)."""
from __future__ import annotations

import os
import time
from typing import Any

from raeflow.train.loop import EpochResult


def epoch_line(r: EpochResult, total: int) -> str:
    """The live progress line: epoch, stage, the loss terms, throughput."""
    keys = [k for k in r.metrics if k.startswith(("train_", "val_")) and not k.endswith("_n")]
    terms = " ".join(f"{k}={r.metrics[k]:.4g}" for k in keys[:8])
    best = " *" if r.is_best else ""
    return (f"epoch {r.epoch}/{total} [{r.stage}] {terms} | {r.metrics['samples_per_s']:.0f} samples/s "
            f"{r.metrics['epoch_s']:.1f}s{best}")


def metrics_row(r: EpochResult) -> dict[str, Any]:
    return {"epoch": r.epoch, "stage": r.stage, **{k: v for k, v in r.metrics.items()},
            "best": r.is_best, "time": time.time()}


def threads_per_worker(workers: int, requested: int | None) -> int:
    if requested:
        return requested
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when set to a positive integer, else None. An in-process run without ``train.threads``
    honours it, as torch itself does: two runs started side by side with ``OMP_NUM_THREADS=1`` on two cores must
    not each set two OpenMP threads, which then spin-wait on each other (measured side by side on this 2-core
    machine: an AAE epoch 290 s instead of 55 s, a contractive AE's 50 s instead of 8 s, most of it in libgomp's
    spin loop). Ray sets the variable in its own workers, which size their threads from their share of the node
    instead."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None
