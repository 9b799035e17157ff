"""Ray Train engine: every variant's :class:`~raeflow.train.loop.Trainer`, data-parallel on a ``TorchTrainer``
(a plain ``DataParallelTrainer`` for one CPU worker: see :func:`_trainer_class`).

Driver (:func:`fit_ray`): joins or starts Ray, checks resources (``--gpu`` with no GPU fails here, before any
worker starts), puts the train and validation splits into Ray Data, and runs ``TorchTrainer.fit``. Rank 0's
epoch rows and every rank's log lines ride on the epoch's ``ray.train.report``; a callback in the TrainController
(which Ray Train places on the driver's node) appends them to a spool file in the run directory, and a driver
thread tails it, prints the progress line and appends the row to ``metrics.jsonl``. So the file lives in the run
directory even when the workers run on other nodes, and no actor of ours runs beside Ray Train's.

Workers (:func:`train_loop_per_worker`, imported by module name): build the model from the driver's weights,
take their Ray Data shard, and hand the same Trainer used by ``--local`` a DDP wrapper, an all-reduce and an
epoch-end hook that reports metrics and checkpoints (the full ``Trainer.state_dict()``) to Ray Train.

Data: a shard that fits in memory is read from Ray Data once per worker into tensors and shuffled per epoch by
``TensorBatches`` (Ray Data's per-batch iteration measured 2.5x slower than a DataLoader on 2 cores: a 20k x 784
AE's 2 epochs took 4.9 s from a Ray Data shard against 1.9 s from a DataLoader);
a larger one is streamed every epoch with ``iter_torch_batches``.

Checkpoints: Ray Train's, under ``<run>/ray/<name>/`` (or ``--storage-path``), scored by the variant's selection
metric in the final stage only (earlier stages score +inf, so an SDAE pretraining epoch can never be "best").
Ray keeps the ``keep_checkpoints`` best plus always the latest, which is what a restarted worker group and
``--resume`` continue from. Reusing the run's ``RunConfig(name, storage_path)`` is what makes Ray resume.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn as nn

from raeflow import raycluster  # noqa: I001

import ray
import ray.train
from ray.train import BackendConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # TorchTrainer's base in Train v2

from raeflow.config import RunConfig as RaeRunConfig
from raeflow.data import ArrayDataset, SparseRows, TrainingData
from raeflow.data.stream import StreamedData, as_float, in_memory_bytes
from raeflow.registry import build_model
from raeflow.train.spool import RELAY_KEY, SPOOL, SpoolCallback
from raeflow.train.loop import EpochResult, TensorBatches, Trainer, seed_everything, selection_value, window_shuffled
from raeflow.train.rundir import RunDir, load_checkpoint, save_checkpoint
from raeflow.train.report import epoch_line, metrics_row, threads_per_worker
from raeflow.errors import InputError, MissingFileError

_OWNER = "raeflow.train"  # raycluster owner tag: fit_ray stops only a Ray instance that training started
#: Recorded in the run directory: the Ray run to continue on ``--resume``.
RAY_RUN_FILE = "ray.json"
#: Score of checkpoints from stages before the final one (never selected as the best model).
NOT_FINAL = math.inf
#: Materialise a worker's shard when it is at most this fraction of the memory Ray reports per worker.
MATERIALIZE_FRACTION = 0.25
#: Test-only fault injection, read on the driver: fail worker ``world-1`` once, mid-epoch N, leaving a marker.
FAIL_AT_EPOCH_ENV = "RAEFLOW_TEST_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "RAEFLOW_TEST_FAIL_MARKER"
#: ``auto`` (default) | ``materialize`` | ``stream``: how workers read their shard.
DATA_MODE_ENV = "RAEFLOW_RAY_DATA_MODE"


# ============================================================================================ driver side
def preflight(cfg: RaeRunConfig, log: Callable[[str], None] = print, *, data_bytes: int = 0):
    """Join/start Ray and check the resources the run asks for; fails before any directory or worker is made.

    Returns the :class:`~raeflow.raycluster.WorkerPlan`.
    """
    if cfg.ray.gpu and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        if not torch.cuda.is_available():  # a local cluster would have no GPU either: say so without starting Ray
            raise InputError("--gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False) and no Ray "
                             "cluster was given. Drop --gpu to train on CPU, or pass --address of a cluster "
                             "with GPUs.")
    raycluster.ensure_ray(cfg.ray.address, object_store_memory=raycluster.object_store_for(data_bytes),
                          owner=_OWNER, log=log)
    res = ray.cluster_resources()
    try:
        return raycluster.plan_workers(int(cfg.ray.workers), float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                                       use_gpu=cfg.ray.gpu)
    except ValueError:
        raycluster.shutdown_if_started(_OWNER)
        raise


def to_ray_dataset(ds: ArrayDataset, blocks: int) -> "ray.data.Dataset":
    """Rows ``{"i": row index, "x": (*shape) float32, "y": int64}`` as a Ray Dataset of ``blocks`` in-store Arrow
    blocks. Arrow tensor columns (not fixed-size lists) so that batches come back as ``(B, *shape)`` ndarrays;
    the row index because Ray Data does not keep block order, and workers that share out an unsplit dataset
    must agree on who takes which row.
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(ds)
    bounds = np.linspace(0, n, max(1, min(blocks, n)) + 1).astype(int)
    tables = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cols = {"i": pa.array(np.arange(a, b, dtype=np.int64))}
        if isinstance(ds.x, SparseRows):  # documents stay sparse in the store; workers densify per batch
            cols.update(sparse_columns(ds.x.csr[a:b]))
        else:
            cols["x"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(ds.x[a:b], dtype=np.float32))
        if ds.y is not None:
            cols["y"] = pa.array(np.asarray(ds.y[a:b], dtype=np.int64))
        tables.append(pa.table(cols))
    return ray.data.from_arrow(tables)


def sparse_columns(csr) -> dict[str, "pa.Array"]:
    """CSR rows as two Arrow list columns sharing offsets: ``xi`` (int32 columns) and ``xv`` (float32 values)."""
    import pyarrow as pa

    offsets = pa.array((csr.indptr - csr.indptr[0]).astype(np.int32))
    return {"xi": pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(np.int32))),
            "xv": pa.ListArray.from_arrays(offsets, pa.array(csr.data.astype(np.float32)))}


def sparse_rows(xi, xv, width: int) -> SparseRows:
    """The inverse of :func:`sparse_columns` for one batch (Arrow list arrays or chunked arrays)."""
    import pyarrow as pa
    import scipy.sparse as sp

    xi = xi.combine_chunks() if isinstance(xi, pa.ChunkedArray) else xi
    xv = xv.combine_chunks() if isinstance(xv, pa.ChunkedArray) else xv
    offsets = np.asarray(xi.offsets.to_numpy(), np.int64)
    indptr = offsets - offsets[0]
    indices = xi.values.to_numpy()[offsets[0]:offsets[-1]]
    values = xv.values.to_numpy()[offsets[0]:offsets[-1]]
    return SparseRows(sp.csr_matrix((values, indices, indptr), shape=(len(xi), width)))


def _data_mode(data: TrainingData, workers: int) -> str:
    if isinstance(data, StreamedData):
        return "stream"
    mode = os.environ.get(DATA_MODE_ENV, "auto")
    if mode not in ("auto", "materialize", "stream"):
        raise InputError(f"{DATA_MODE_ENV}={mode!r}: use auto, materialize or stream")
    if mode != "auto":
        return mode
    shard = data.train.x.nbytes / workers
    per_worker_memory = ray.cluster_resources().get("memory", 0) / max(1, workers)
    return "materialize" if shard <= MATERIALIZE_FRACTION * per_worker_memory else "stream"


def _ray_run(run: RunDir, cfg: RaeRunConfig, resume: bool) -> dict[str, str]:
    """The Ray run's (name, storage_path): new and unique, or the recorded one on ``--resume``."""
    path = run.path / RAY_RUN_FILE
    if resume:
        if not path.is_file():
            raise MissingFileError(f"--resume: {run.path} has no {RAY_RUN_FILE}: it was not trained on Ray "
                                    "(resume it with --local)")
        return json.loads(path.read_text())
    storage = cfg.ray.storage_path or str((run.path / "ray").resolve())
    rec = {"name": f"{cfg.variant}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "storage_path": storage}
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


class _Relay:
    """Driver thread: tails the spool, writes ``metrics.jsonl`` and logs the lines.

    A row for an epoch at or before one already written means the worker group restarted from an earlier
    checkpoint and is re-training those epochs: the file is cut back first, so it ends with each epoch once,
    from the lineage that finished.
    """

    def __init__(self, spool: Path, run: RunDir, log: Callable[[str], None], poll_s: float = 0.25):
        self.spool, self.run, self.log, self.poll_s = spool, run, log, poll_s
        spool.write_text("")  # a resumed run's spool starts empty: its rows are in metrics.jsonl already
        self._pos = 0
        self.last_epoch = max((r.get("epoch", 0) for r in run.read_metrics()), default=0)
        self.received: list[int] = []  # every epoch row received, in order (restarts show up as repeats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="raeflow-metrics", daemon=True)

    def start(self) -> "_Relay":
        self._thread.start()
        return self

    def _handle(self, item: list) -> None:
        kind, payload = item[0], item[1]
        if kind == "log":
            self.log(payload)
            return
        row, total = payload, item[2]
        if kind == "restored":  # the resumed checkpoint's own row: written only where metrics.jsonl lacks it
            if self.run.fill_in_row(row):
                self.last_epoch = row["epoch"]
            return
        if row["epoch"] <= self.last_epoch:
            self.run.truncate_metrics(row["epoch"] - 1)
        self.run.append_metrics(row)
        self.last_epoch = row["epoch"]
        self.received.append(row["epoch"])
        r = EpochResult(row["epoch"], row["stage"], {k: v for k, v in row.items() if isinstance(v, float)},
                        bool(row.get("best")), bool(row.get("final")), "")
        self.log(epoch_line(r, total))

    def _drain(self) -> None:
        """Handle every complete line the controller has appended since the last call."""
        with open(self.spool) as f:
            f.seek(self._pos)
            chunk = f.read()
        done = chunk.rfind("\n") + 1  # a line still being written waits for the next call
        self._pos += len(chunk[:done].encode())
        for line in chunk[:done].splitlines():
            self._handle(json.loads(line))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)
        self._drain()  # what the controller appended after the thread's last poll
        self.spool.unlink(missing_ok=True)


def fit_ray(cfg: RaeRunConfig, model: nn.Module, data: TrainingData, run: RunDir, resume: bool,
            log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Train on Ray Train; returns the selected (best, final-stage) model state."""
    from ray.util.client import ray as ray_client

    if ray_client.is_connected() or (raycluster.resolved_address(cfg.ray.address) or "").startswith("ray://"):
        # Train places its controller on the node that runs the driver: under Ray Client that is the cluster's
        # head, not this machine, so the controller's spool (and Ray's local checkpoints) would never reach here.
        raise InputError("raeflow train does not run over Ray Client (ray://): progress and checkpoints are "
                         "written on the cluster's head node. Run the driver on the cluster instead: "
                         "ray job submit --address http://HEAD:8265 -- raeflow train --address auto ...")
    plan = preflight(cfg, log, data_bytes=in_memory_bytes(data))
    try:
        return _fit(cfg, model, data, run, resume, plan, log)
    finally:
        raycluster.shutdown_if_started(_OWNER)


def _fit(cfg, model, data, run, resume, plan, log) -> dict[str, torch.Tensor]:
    workers = plan.workers
    if not cfg.ray.gpu and (cfg.ray.amp or cfg.ray.compile):
        log("ray.amp / ray.compile apply on GPU only: ignored on CPU")
    per_worker_bs = max(1, cfg.train.batch_size // workers)
    if per_worker_bs * workers != cfg.train.batch_size:
        log(f"batch size {cfg.train.batch_size} does not divide by {workers} workers: global batch "
            f"{per_worker_bs * workers}")
    mode = _data_mode(data, workers)
    rec = _ray_run(run, cfg, resume)
    how = {"materialize": "read once into memory", "stream": "streamed"}[mode]
    log(f"ray train: {plan.describe()}; {per_worker_bs} rows per worker per step; data {how} per worker; "
        f"checkpoints in {rec['storage_path']}/{rec['name']}")
    if len(ray.nodes()) > 1 and "://" not in rec["storage_path"]:
        log("warning: a multi-node cluster with a local storage path: pass --storage-path on shared storage "
            "(s3://, gs://, NFS) or checkpoints from other nodes cannot be restored")

    if isinstance(data, StreamedData):  # read by Ray Data tasks from the files, block by block, every epoch
        datasets = data.datasets(shuffle_seed=cfg.train.seed)
    else:
        blocks = max(2 * workers, math.ceil(data.train.x.nbytes / (64 * 2**20)))
        datasets = {"train": to_ray_dataset(data.train, blocks)}
        if data.val is not None:
            datasets["val"] = to_ray_dataset(data.val, 2 * workers)
    spool = run.path / SPOOL
    fail_at = os.environ.get(FAIL_AT_EPOCH_ENV)
    loop_config = {
        "run": cfg.to_dict(), "variant": cfg.variant, "model_config": dict(model.config),
        "init_state": ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()}),
        "global_batch": per_worker_bs * workers, "has_val": data.val is not None, "data_mode": mode,
        "n_train": len(data.train), "sparse": isinstance(getattr(data.train, "x", None), SparseRows), "use_gpu": bool(cfg.ray.gpu),
        "_fail_at_epoch": int(fail_at) if fail_at else None, "_fail_marker": os.environ.get(FAIL_MARKER_ENV),
    }
    # Train is split by Ray Data; validation too when streamed (materialised, each worker slices its share). One
    # worker splits nothing: Ray Data would start a SplitCoordinator actor (600 MiB PSS measured streaming, Ray
    # 2.60) to hand every row to the only worker, which now runs the read pipeline itself.
    split = [] if workers == 1 else ["train", "val"] if mode == "stream" else ["train"]
    trainer = _trainer_class(workers, bool(cfg.ray.gpu))(
        train_loop_per_worker, train_loop_config=loop_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.ray.gpu),
                                     placement_strategy=_placement(cfg.ray.placement),
                                     resources_per_worker={"CPU": plan.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.ray.gpu else {})}),
        run_config=RunConfig(
            name=rec["name"], storage_path=rec["storage_path"], callbacks=[SpoolCallback(str(spool))],
            # max_failures: worker-group restarts from the latest checkpoint. controller_failure_limit=0: a
            # worker group that cannot start is an error, not an endless retry (with Ray 2.60's default
            # controller_failure_limit=-1 a failed start leaks its placement group and the next fit retries forever).
            failure_config=FailureConfig(max_failures=int(cfg.ray.max_failures), controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, int(cfg.train.keep_checkpoints)),
                                               checkpoint_score_attribute="selection",
                                               checkpoint_score_order="min")))
    relay = _Relay(spool, run, log).start()
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        log(f"training failed; continue it with: raeflow train --resume -o {run.path}")
        raise
    finally:
        relay.stop()
    log(f"ray train: fit {time.perf_counter() - t0:.1f}s")
    return _best_model_state(result)


def _trainer_class(workers: int, gpu: bool):
    """The Ray Train trainer for this worker group: ``TorchTrainer`` with raeflow's node-local process group,
    except for a single CPU worker, which has nobody to all-reduce with and gets a plain ``DataParallelTrainer``.

    Why: the backend config travels to the TrainController actor, and ``ray.train.torch``'s config module imports
    torch there. Measured streaming 200k rows (Ray 2.60, one worker): the controller's PSS 265 MiB with
    ``TorchTrainer`` against ~115 MiB for a Ray actor without torch, and the torch import (2.2-2.5 s here) sits on
    the path from ``fit`` to the first step. A one-process gloo group did nothing the worker uses (it all-reduces
    only when world > 1). A GPU worker keeps ``TorchTrainer``: its device set-up is the torch backend's.
    """
    own = raycluster.owns_instance()
    if workers == 1 and not gpu:
        return functools.partial(_OwnRayDataParallelTrainer if own else DataParallelTrainer,
                                 backend_config=BackendConfig())
    from raeflow.train.rendezvous import NodeLocalTorchConfig

    # torch.distributed's sockets on the node's address, not on every interface
    return functools.partial(_OwnRayTorchTrainer if own else TorchTrainer, torch_config=NodeLocalTorchConfig())


class _NoPlacementGroupCleaner:
    """For a Ray instance raeflow started itself (and stops when the run ends): no PlacementGroupCleaner.

    Train v2 starts that cleaner as a *detached* actor so that the worker group's placement group is removed even
    if the controller dies and the cluster lives on. A local instance raeflow started lives exactly as long as
    this run (``shutdown_if_started``; Ray's reaper if the driver is killed), so the cleaner guards nothing, and
    it is a whole Python process: measured streaming with one worker (Ray 2.60), 121 MiB PSS and 3.5 s of the
    ~19 s from ``fit`` to the first step, started before the worker group. Joined clusters and Ray instances
    someone else started keep it. ``_create_default_callbacks`` is Train v2's private hook (Ray 2.60 pinned);
    ``tests/test_ray_train.py`` checks that it still yields the cleaner we remove.
    """

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


class _OwnRayDataParallelTrainer(_NoPlacementGroupCleaner, DataParallelTrainer):
    pass


class _OwnRayTorchTrainer(_NoPlacementGroupCleaner, TorchTrainer):
    pass


def _placement(strategy: str) -> str:
    s = str(strategy).upper()
    if s not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        from raeflow.errors import ConfigError

        raise ConfigError(f"ray.placement={strategy!r}: use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    return s


def _best_model_state(result) -> dict[str, torch.Tensor]:
    """The model of the best final-stage checkpoint (lowest ``selection``; of equals the earliest, as the
    Trainer's strict "improved" test and the summary table choose), else of the latest checkpoint."""
    final = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("final_stage")]
    ckpt = min(final, key=lambda cm: (cm[1]["selection"], cm[1]["epoch"]))[0] if final else result.checkpoint
    if ckpt is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with ckpt.as_directory() as d:
        return load_checkpoint(d)["model"]


# ============================================================================================ worker side
def weights_digest(model: nn.Module) -> str:
    """A short hash of the exact bytes of every parameter and buffer: equal digests = identical weights."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _materialize(shard, shape: tuple[int, ...], share: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read this worker's shard once, whole blocks at a time, into contiguous tensors; ``share=(rank, world)``
    keeps the rows whose index is ``rank`` modulo ``world`` (a dataset Ray Data did not split)."""
    xs, ys = [], []
    for b in shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        keep = None if share is None else np.flatnonzero((b["i"].to_numpy() % share[1]) == share[0])
        if keep is not None:
            b = b.take(pa.array(keep))
        if "xi" in b.column_names:  # sparse document rows: kept sparse (SparseRows.take)
            xs.append(sparse_rows(b["xi"], b["xv"], int(shape[0])).csr)
        else:
            xs.append(_tensor_numpy(b["x"]))
        if "y" in b.column_names:
            ys.append(np.array(b["y"].to_numpy()))
    y = torch.from_numpy(np.concatenate(ys)) if ys else None
    if xs and not isinstance(xs[0], np.ndarray):
        import scipy.sparse as sp

        return SparseRows(sp.vstack(xs, format="csr")), y
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, *shape)) if xs else torch.empty(0, *shape)
    return x, y


def _tensor_numpy(col) -> np.ndarray:
    """An Arrow tensor column (Ray's extension type) as one ndarray."""
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.to_numpy()


class _StreamBatches:
    """One epoch of this worker's shard streamed from Ray Data (a shard too large to hold in memory)."""

    def __init__(self, shard, batch_size: int, shape, *, drop_last: bool, shuffle_seed: int | None,
                 sparse: bool = False, buffer_batches: int = 20):
        self.shard, self.batch_size, self.shape = shard, batch_size, shape
        self.drop_last, self.shuffle_seed, self.sparse = drop_last, shuffle_seed, sparse
        self.buffer_batches = buffer_batches

    def __iter__(self):
        shuffle = dict(local_shuffle_buffer_size=None if self.shuffle_seed is None or not self.buffer_batches
                       else self.buffer_batches * self.batch_size,
                       local_shuffle_seed=self.shuffle_seed)
        if self.sparse:  # list columns cannot become tensors: densify each batch here (Ray shuffles the rows)
            for b in self.shard.iter_batches(batch_size=self.batch_size, drop_last=self.drop_last,
                                             batch_format="pyarrow", **shuffle):
                x = torch.from_numpy(sparse_rows(b["xi"], b["xv"], int(self.shape[0]))[:])
                yield x, (torch.tensor(b["y"].to_numpy()) if "y" in b.column_names else None)
            return
        # Dense rows: read in windows of buffer_batches batches and shuffled here (window_shuffled), not by Ray
        # Data's local shuffle buffer; still uint8 until each batch is scaled.
        shuffled = self.shuffle_seed is not None and self.buffer_batches > 0
        window = self.batch_size * (self.buffer_batches if shuffled else 1)
        windows = ((b["x"], b.get("y")) for b in self.shard.iter_torch_batches(batch_size=window, device="cpu"))
        for x, y in window_shuffled(windows, self.batch_size, seed=self.shuffle_seed if shuffled else None,
                                    drop_last=self.drop_last):
            yield as_float(x).reshape(-1, *self.shape), y


#: glibc thresholds for a training worker (see steady_malloc): allocations under 64 MiB come from the heap, and
#: up to 256 MiB of freed heap is kept for the next step instead of being handed back to the kernel.
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 * 2**20, 256 * 2**20


def steady_malloc() -> None:
    """Keep a training worker's per-step buffers in the heap. Measured here (`raeflow bench train`, batch 128,
    one worker of two threads): inside a Ray Train worker the same loop ran at 0.64x the plain loop and took 15k
    page faults a second, every step's activations and gradients mapped afresh and zeroed by the kernel; in a
    plain Ray task or a thread of a plain process it did not. With these thresholds fixed (which also stops
    glibc's dynamic adjustment) the worker ran at 0.97-1.0x. The bound on memory is the thresholds themselves:
    at most 256 MiB of free heap kept per worker. No-op off glibc."""
    from raeflow.data.readers import fix_malloc

    fix_malloc(MMAP_THRESHOLD, TRIM_THRESHOLD)


#: Shortest period of Ray Data's scheduling loop in a Train worker that streams (see pace_data_executor).
EXECUTOR_MIN_PERIOD_S = 0.02


def pace_data_executor(min_period_s: float = EXECUTOR_MIN_PERIOD_S) -> None:
    """Make Ray Data's scheduling loop in this process wait out ``min_period_s`` per step (idempotent).

    Why: with one worker there is no split coordinator, so the worker runs the streaming executor of its epoch in
    a thread of its own process. When training is slower than the read -- always, on a corpus larger than the
    object-store budget -- the read tasks sit backpressured with finished output that the executor may not take,
    so its ``ray.wait`` returns at once and the loop spins. Measured on 2,000,000 rows (Ray 2.60, one worker, two
    torch threads): the executor thread took 59% of a core and the training thread's GIL with it, and the epoch ran
    at 1,381 samples/s against 3,303-3,529 on 200,000 rows, whose read finishes before it is ever backpressured.
    A 20 ms floor per step costs at most 20 ms before a new read task starts, against seconds of training per
    16,384-row block. This patches a private method of Ray Data (ray==2.60.0 is pinned; a test checks it still
    exists) and only in the Train worker's process.
    """
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    step = StreamingExecutor._scheduling_loop_step
    if getattr(step, "_raeflow_paced", False):
        return

    def paced(self, topology):
        t0 = time.perf_counter()
        more = step(self, topology)
        rest = min_period_s - (time.perf_counter() - t0)
        if more and rest > 0:
            time.sleep(rest)
        return more

    paced._raeflow_paced = True
    StreamingExecutor._scheduling_loop_step = paced


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the shared Trainer under DDP on this worker's shard."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-iteration "Starting execution" lines
    started = {"worker_start_time": time.time()}  # start-up phases, in the first row of each worker group
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RaeRunConfig.from_dict(config["run"])
    outbox: list[list] = []  # relay items (log lines, rank 0's rows) until the next report carries them

    def say(line: str) -> None:
        outbox.append(["log", line])

    def report(metrics: dict, **kw) -> None:
        ray.train.report({**metrics, RELAY_KEY: list(outbox)}, **kw)
        outbox.clear()

    threads = threads_per_worker(ctx.get_local_world_size(), cfg.train.threads)
    # Ray sets OMP_NUM_THREADS to the worker's CPU request (1 or a fraction): without this each worker would
    # run one thread however many cores its node has.
    torch.set_num_threads(threads)
    steady_malloc()
    if config["data_mode"] == "stream":
        pace_data_executor()
    use_gpu = bool(config["use_gpu"])
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    # Per-rank RNG streams: corruption and dynamic binarisation noise differ between workers.
    seed_everything(cfg.train.seed + 1000003 * rank)
    model = build_model(config["variant"], **config["model_config"])
    model.load_state_dict(ray.get(config["init_state"]))  # every worker starts from the driver's weights

    def all_reduce_sum(t: torch.Tensor) -> None:
        if world > 1:  # NCCL needs device tensors; the Trainer's sums are CPU float64
            buf = t.to(device)
            dist.all_reduce(buf)
            t.copy_(buf)

    def wrap(m: nn.Module) -> nn.Module:
        out = m
        if world > 1:
            # find_unused_parameters: a phase (AAE's discriminator step, say) uses only some parameters.
            out = nn.parallel.DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        if use_gpu and cfg.ray.compile:
            out = torch.compile(out)
        return out

    trainer = Trainer(model, cfg.train, device=device, wrap=wrap, all_reduce_sum=all_reduce_sum,
                      amp=use_gpu and cfg.ray.amp, log=say if rank == 0 else None)
    restored_at = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d)
        trainer.load_state_dict(state)
        restored_at = trainer.progress.epoch
        if rank != 0:  # the checkpoint holds rank 0's RNG state: give the other ranks their own streams again
            seed_everything(cfg.train.seed + 1000003 * rank + 7919 * restored_at)
        if rank == 0:
            say(f"restored from checkpoint at epoch {restored_at}")
            if state.get("row"):
                # Ray keeps a checkpoint before the controller relays its epoch's row, so a driver killed in
                # between resumes past an epoch metrics.jsonl lacks: the checkpoint carries that row to fill it in.
                outbox.append(["restored", state["row"], trainer.total_epochs])
    if rank == 0:
        say(f"ray train: {world} worker(s), {threads} torch thread(s) each, device {device}")

    shape = tuple(model.input_shape)
    # The global batch is the run's; each worker's share follows the size of *this* worker group, so a group
    # restarted with another size (a lost node, an elastic resize) still steps on the same global batch.
    bs = max(1, int(config["global_batch"]) // world)
    node = ray.get_runtime_context().get_node_id()
    say(f"ray train: rank {rank}/{world} on node {node[:12]} ({socket.gethostname()}), {bs} rows per step")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    if config["data_mode"] == "materialize":
        x, y = _materialize(train_shard, shape)
        # Ray Data splits equally; make certain all ranks take the same number of steps or DDP would wait forever.
        n = torch.tensor([len(x)], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
        x = x.take(slice(0, int(n))) if isinstance(x, SparseRows) else x[: int(n)]
        y = None if y is None else y[: int(n)]
        batches = TensorBatches(x, y, min(bs, len(x)), seed=cfg.train.seed + 7919 * rank)
        whole = TensorBatches(x, y, max(bs, 512), shuffle=False, drop_last=False)
        steps = len(batches)
        val = None
        if val_shard is not None:
            # Validation is not split by Ray Data in this mode (one split coordinator actor less to start):
            # every worker reads it and keeps its strided share; the Trainer sums the shares across workers.
            vx, vy = _materialize(val_shard, shape, share=(rank, world))
            val = TensorBatches(vx, vy, max(bs, 512), shuffle=False, drop_last=False)
        val_batches = (lambda: val) if val is not None else None
    else:
        steps = (int(config["n_train"]) // world) // bs
        val_batches = None
        if val_shard is not None:
            val_batches = lambda: _StreamBatches(val_shard, max(bs, 512), shape,  # noqa: E731
                                                 drop_last=False, shuffle_seed=None, sparse=config["sparse"])

    started["data_ready_time"] = time.time()
    report({})  # the start-up lines reach the driver now, not with epoch 1's row
    fail_at, marker = config.get("_fail_at_epoch"), config.get("_fail_marker")

    loop_cpu = {"s": 0.0}

    def cpu_timed(batches):
        """This process's CPU seconds over the training loop (to the last step), a figure other load on the
        machine barely moves, unlike wall time."""
        c0 = time.process_time()
        yield from batches
        loop_cpu["s"] = time.process_time() - c0

    def train_batches(epoch: int):
        return cpu_timed(_train_batches(epoch))

    def _train_batches(epoch: int):
        closed_form = trainer.stages[trainer.progress.stage].closed_form
        if config["data_mode"] == "materialize":
            if closed_form:  # moments from every row, not whole batches only: same fit as a single process
                it = whole
            else:
                batches.set_epoch(epoch)
                it = batches
        else:
            it = _StreamBatches(train_shard, bs, shape, drop_last=not closed_form, sparse=config["sparse"],
                                buffer_batches=cfg.data.shuffle_buffer,
                                shuffle_seed=None if closed_form else cfg.train.seed + 7919 * rank + epoch)
        if fail_at is not None and epoch + 1 == fail_at and rank == world - 1 and marker \
                and not os.path.exists(marker):
            return _fail_midway(it, marker, epoch + 1)
        return it

    total = trainer.total_epochs
    every = max(1, int(cfg.train.checkpoint_every))
    final_name = trainer.stages[-1].name

    def on_epoch_end(r: EpochResult) -> None:
        nonlocal restored_at
        mine = (weights_digest(trainer.model), loop_cpu["s"], node)
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        digests = [d for d, _, _ in gathered]
        final_stage = r.stage == final_name
        sel = selection_value(r.metrics, r.selection_metric)
        metrics = {**r.metrics, "epoch": r.epoch, "stage": r.stage, "final_stage": final_stage,
                   "selection": float(sel) if final_stage else NOT_FINAL}
        if rank == 0:
            row = metrics_row(r)
            row.update(workers=world, steps=steps, batch_per_worker=bs, weights_sha=digests,
                       weights_in_sync=len(set(digests)) == 1, cpu_s=sum(c for _, c, _ in gathered),
                       nodes=[n for _, _, n in gathered])  # the Ray node id each rank ran this epoch on
            if restored_at is not None:
                row["resumed_from"] = restored_at
                restored_at = None
            if started:
                row.update(started)
                started.clear()
            outbox.append(["row", row, total])
        # Every epoch is reported: the report carries the relay items to the driver (a report is a barrier across
        # workers and waits for the controller to have taken the previous one: once an epoch, negligible). The
        # checkpoint only every `checkpoint_every` epochs, the final and the best. Synchronous upload: the report
        # is queued before training goes on, so a failure later in the next epoch restarts from this checkpoint.
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0 and (r.epoch % every == 0 or r.final or r.is_best):  # one copy: identical on every rank
                save_checkpoint({**trainer.state_dict(), "row": row}, d)  # the row: see the restore above
                checkpoint = ray.train.Checkpoint.from_directory(d)
            report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{r.epoch:04d}")

    trainer.fit(train_batches, val_batches, steps, on_epoch_end)


def _fail_midway(batches, marker: str, epoch: int):
    """Test hook: yield two batches of the epoch, then die once (the marker file spares the replacement)."""
    items = iter(batches)
    n = 0
    for item in items:
        yield item
        n += 1
        if n >= 2:
            break
    Path(marker).write_text(f"failed at epoch {epoch}\n")
    raise RuntimeError(f"injected worker failure at epoch {epoch} ({FAIL_AT_EPOCH_ENV})")
