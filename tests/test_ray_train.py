"""Ray Train engine: every variant data-parallel on 2 workers, worker failure, driver kill + --resume, --gpu.

Real parts throughout: a local Ray (started once per session by the ``ray_local`` fixture), real TorchTrainer
fits on scikit-learn digits, real checkpoints. Each fit costs ~20 s of fixed Ray Train start-up on 2 cores,
so each test does one fit and checks everything that fit can show.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import raeflow
from raeflow.config import RunConfig
from raeflow.models.base import TrainPlan
from raeflow.raycluster import plan_workers
from raeflow.registry import build_model
from raeflow.train.rundir import RunDir, load_checkpoint


def _cfg(variant: str, out: Path, *, workers: int = 2, epochs: int = 2, **train) -> RunConfig:
    cfg = RunConfig(variant=variant, output=str(out))
    cfg.data.dataset = "digits"
    cfg.train.epochs = epochs
    cfg.ray.workers = workers
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _rows(out: Path) -> list[dict]:
    return RunDir(out).read_metrics()


def _ray_run_dir(out: Path) -> Path:
    rec = json.loads((out / "ray.json").read_text())
    return Path(rec["storage_path"]) / rec["name"]


# ------------------------------------------------------------------------------------ no Ray needed
def test_plan_workers_leaves_a_cpu_for_ray_data():
    # Measured on 2 CPUs: 4 workers x 0.5 CPU hang (Ray Data gets no CPU); 4 x 0.25 run.
    p = plan_workers(4, 2.0)
    assert (p.cpus_per_worker, p.reserved_cpus) == (0.25, 1.0)
    assert p.cpus_per_worker * p.workers + p.reserved_cpus <= 2.0
    assert "fractional" in p.describe()
    assert plan_workers(2, 2.0).cpus_per_worker == 0.5
    assert plan_workers(1, 2.0).cpus_per_worker == 1.0
    assert plan_workers(3, 2.0).cpus_per_worker == 0.33
    big = plan_workers(4, 16.0)
    assert big.cpus_per_worker == 1.0 and big.notes == []
    assert plan_workers(1, 1.0).cpus_per_worker == 0.5


def test_plan_workers_gpu_errors_are_clear():
    with pytest.raises(ValueError, match="no GPU"):
        plan_workers(2, 8.0, 0.0, use_gpu=True)
    with pytest.raises(ValueError, match="need one GPU each"):
        plan_workers(4, 8.0, 2.0, use_gpu=True)
    p = plan_workers(2, 8.0, 2.0, use_gpu=True)
    assert (p.gpus_per_worker, p.cpus_per_worker) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        plan_workers(0, 2.0)


def test_one_cpu_worker_gets_a_trainer_whose_controller_needs_no_torch(tmp_path):
    """The TrainController unpickles the trainer's backend config and raeflow's callback: for one CPU worker
    neither may import torch
    (measured: 265 -> 131 MiB PSS for the controller, and torch's 2.2-2.5 s import off the path to the first
    step); a group of several keeps TorchTrainer and raeflow's node-local process group."""
    import pickle

    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raeflow.train.ray_engine import _trainer_class
    from raeflow.train.spool import SpoolCallback

    one, two, gpu = _trainer_class(1, False), _trainer_class(2, False), _trainer_class(1, True)
    assert issubclass(one.func, DataParallelTrainer) and not issubclass(one.func, TorchTrainer)
    assert issubclass(two.func, TorchTrainer) and issubclass(gpu.func, TorchTrainer)
    assert type(two.keywords["torch_config"]).__name__ == "NodeLocalTorchConfig"
    blob = pickle.dumps([one.keywords["backend_config"], SpoolCallback(str(tmp_path / "spool"))])
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False"
    # the contrast that makes the check meaningful: the torch backend's config does import torch there
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(two.keywords["torch_config"]),
                         capture_output=True, check=True)
    assert out.stdout.decode().strip() == "True"


def test_a_ray_instance_raeflow_started_runs_no_placement_group_cleaner(ray_local, monkeypatch):
    """The cleaner is a detached actor (a whole process: 121 MiB, 3.5 s of start-up measured) that outlives a
    dead controller on a cluster that lives on; a local instance raeflow started ends with the run, so it is
    dropped there and kept everywhere else. Also pins the private Train v2 hook that yields it (Ray 2.60)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from raeflow import raycluster
    from raeflow.train.ray_engine import _trainer_class

    def callbacks(workers):
        trainer = _trainer_class(workers, False)(lambda: None, scaling_config=ScalingConfig(num_workers=workers))
        return [type(c) for c in trainer._create_default_callbacks()]

    assert raycluster.owns_instance()  # the session's instance was started by raeflow.raycluster.ensure_ray
    for workers in (1, 2):
        own = callbacks(workers)
        assert PlacementGroupCleanerCallback not in own and len(own) >= 3  # the others stay
        monkeypatch.setattr(raycluster, "_started_by", None)  # as if someone else had started this Ray
        theirs = callbacks(workers)
        monkeypatch.undo()
        assert PlacementGroupCleanerCallback in theirs and set(theirs) - set(own) == {PlacementGroupCleanerCallback}


def test_spool_relay_carries_reports_to_metrics_and_log_without_ray(tmp_path):
    """The controller's callback appends every rank's relay items; the driver's relay writes rank 0's rows to
    metrics.jsonl once each (a repeated epoch after a restart cuts the file back), logs every line, waits for a
    line still being written, and removes the spool when it stops."""
    from raeflow.train.ray_engine import _Relay
    from raeflow.train.spool import RELAY_KEY, SPOOL, SpoolCallback

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    spool = run.path / SPOOL
    logs: list[str] = []
    relay = _Relay(spool, run, logs.append, poll_s=60)  # polled by hand below
    cb = SpoolCallback(str(spool))

    def row(epoch, loss):
        return ["row", {"epoch": epoch, "stage": "main", "train_loss": loss, "samples_per_s": 1e3, "epoch_s": 1.0}, 3]

    cb.after_report(None, [{RELAY_KEY: [["log", "rank 0 up"]]}, {RELAY_KEY: [["log", "rank 1 up"]]}], None)
    cb.after_report(None, [{"loss": 1.0, RELAY_KEY: [row(1, 0.5)]}, {RELAY_KEY: []}], None)
    cb.after_report(None, [{RELAY_KEY: [row(2, 0.4)]}, {}], None)
    with open(spool, "a") as f:
        f.write('["log", "half a li')  # the controller mid-write
    relay._drain()
    assert logs[:2] == ["rank 0 up", "rank 1 up"] and len(logs) == 4
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    with open(spool, "a") as f:
        f.write('ne"]\n')
    cb.after_report(None, [{RELAY_KEY: [row(2, 0.3)]}], None)  # epoch 2 again: the group restarted from epoch 1
    relay.stop()
    assert "half a line" in logs
    assert [(r["epoch"], r["train_loss"]) for r in run.read_metrics()] == [(1, 0.5), (2, 0.3)]
    assert relay.received == [1, 2, 2] and not spool.exists()


def test_pace_data_executor_floors_each_scheduling_step(monkeypatch):
    """The Train worker's pacing of Ray Data's scheduling loop: the private method it wraps still exists in the
    pinned Ray, each step that continues takes at least the floor, the last one (False) returns at once, and a
    second call does not wrap twice."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from raeflow.train.ray_engine import pace_data_executor

    assert callable(StreamingExecutor._scheduling_loop_step)
    calls = []
    monkeypatch.setattr(StreamingExecutor, "_scheduling_loop_step",
                        lambda self, topology: calls.append(topology) or len(calls) < 5)
    pace_data_executor(0.03)
    pace_data_executor(0.03)
    t0 = time.perf_counter()
    results = [StreamingExecutor._scheduling_loop_step(None, i) for i in range(5)]
    took = time.perf_counter() - t0
    assert results == [True, True, True, True, False] and calls == [0, 1, 2, 3, 4]  # wrapped once
    assert 4 * 0.03 <= took < 4 * 0.03 + 0.1


def test_ray_client_addresses_are_refused_before_ray_starts(tmp_path, monkeypatch):
    """Train's controller runs on the driver's node; under Ray Client that is the head, where the spool would be
    written: refused with advice, before any connection or run directory work."""
    from raeflow.errors import InputError
    from raeflow.train.ray_engine import fit_ray

    cfg = RunConfig(variant="ae", output=str(tmp_path / "run"))
    cfg.ray.address = "ray://head:10001"
    with pytest.raises(InputError, match="ray job submit"):
        fit_ray(cfg, None, None, None, False, log=lambda s: None)
    cfg.ray.address = None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(InputError, match="Ray Client"):
        fit_ray(cfg, None, None, None, False, log=lambda s: None)


def test_sparse_rows_survive_the_arrow_round_trip():
    """Document rows cross Ray as two list columns; a slice of blocks (offsets not starting at 0) comes back as
    the same CSR rows."""
    import pyarrow as pa
    import scipy.sparse as sp

    from raeflow.train.ray_engine import sparse_columns, sparse_rows

    csr = sp.random(50, 30, density=0.1, format="csr", dtype=np.float32, random_state=0)
    t = pa.table(sparse_columns(csr))
    back = sparse_rows(t["xi"], t["xv"], 30)
    assert (back.csr != csr).nnz == 0
    part = t.slice(7, 20)  # list offsets of a slice start mid-array
    assert np.array_equal(sparse_rows(part["xi"], part["xv"], 30)[:], csr[7:27].toarray())


# ---------------------------------------------------------------------------------------- Ray fits
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_sparse_document_rows_materialise_and_stream_dense_per_batch(ray_local):
    """What a worker does with a shard of document rows: materialised, it keeps them sparse (the same rows);
    streamed, every batch arrives dense and together the batches are every row once."""
    import scipy.sparse as sp

    from raeflow.data import ArrayDataset, SparseRows
    from raeflow.train.ray_engine import _materialize, _StreamBatches, to_ray_dataset

    csr = sp.random(300, 40, density=0.05, format="csr", dtype=np.float32, random_state=1)
    y = np.arange(300) % 3
    ds = to_ray_dataset(ArrayDataset("docs", "train", SparseRows(csr), y, ["a", "b", "c"], "text"), blocks=4)
    x, yy = _materialize(ds, (40,))
    assert isinstance(x, SparseRows) and x.shape == (300, 40)
    key = lambda a, lab: sorted(map(tuple, np.column_stack([lab, a]).round(6).tolist()))  # noqa: E731 - as sets
    assert key(x[:], yy.numpy()) == key(csr.toarray(), y)
    got = list(_StreamBatches(ds, 64, (40,), drop_last=False, shuffle_seed=3, sparse=True))
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (40,) for b, _ in got)
    xs = np.concatenate([b.numpy() for b, _ in got])
    ys = np.concatenate([lab.numpy() for _, lab in got])
    assert key(xs, ys) == key(csr.toarray(), y)



def engine_path(variant: str) -> tuple:
    """What the Ray engine can do differently for a model, and all it can: the model reaches it only through
    its stages (how many; per stage its phases -- one optimiser each --, closed form, supervision, frozen
    modules), its buffers (broadcast or all-reduced state: PCA's moments, VQ-VAE's EMA codebook) and the hooks
    it overrides. Variants on one path differ only in their loss, which runs in the same DDP step."""
    from raeflow.data import load_training_data
    from raeflow.models.base import Autoencoder
    from raeflow.train.run import model_config

    cfg = _cfg(variant, Path("unused"))
    model = build_model(variant, **model_config(cfg, load_training_data("digits")))
    stages = tuple((len(s.phases), s.closed_form, s.supervised, bool(s.frozen)) for s in model.stages(TrainPlan(2)))
    hooks = tuple(h for h in ("enter_stage", "accumulate", "finalize")
                  if getattr(type(model), h, None) is not getattr(Autoencoder, h, None))
    return stages, any(True for _ in model.buffers()), hooks


@pytest.fixture(scope="module")
def engine_paths() -> dict[str, str]:
    """variant -> the first variant (by name) on its engine path."""
    first: dict[tuple, str] = {}
    return {v: first.setdefault(engine_path(v), v) for v in raeflow.list_variants()}


def test_engine_paths_group_variants_as_expected(engine_paths):
    # Guards the grouping itself: the layered, adversarial, closed-form and codebook variants each take their
    # own fit; a new variant with a new combination of stages, phases, buffers or hooks gets one automatically.
    for v in ("aae", "pca", "sdae", "vqvae", "pixelcnn"):
        assert engine_paths[v] == v, (v, engine_paths)
    assert len(set(engine_paths.values())) < len(engine_paths)  # and some do share a path


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", raeflow.list_variants())
def test_variant_trains_data_parallel(variant, engine_paths, ray_local, tmp_path):
    """2 workers, 2 epochs per stage: falling loss per stage, identical weights on both workers after every
    epoch (every phase and stage under DDP), metrics complete, best model = best final-stage checkpoint.

    One fit per engine path (see :func:`engine_path`): each costs ~20 s of Ray Train start-up on 2 cores, and a
    variant sharing another's path would exercise nothing new in the engine (its loss is trained by the
    contract tests, locally)."""
    from raeflow.train.run import train

    if engine_paths[variant] != variant:
        pytest.skip(f"same Ray engine path as {engine_paths[variant]}")

    out = tmp_path / "run"
    logs: list[str] = []
    result = train(_cfg(variant, out), log=logs.append)

    model = raeflow.load_model(out)
    stages = model.stages(TrainPlan(2))
    total = sum(s.epochs for s in stages)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == list(range(1, total + 1))
    assert sum(1 for line in logs if line.startswith("epoch ")) == total  # the live progress line, per epoch
    assert any("2 worker(s)" in line for line in logs)
    closed_form = {s.name for s in stages if s.closed_form}
    for r in rows:
        assert r["workers"] == 2 and r["samples_per_s"] > 0 and r["epoch_s"] > 0
        # samples/s counts both workers' rows: steps x 64 per worker x 2 (closed form: every row once)
        seen = 1348 if r["stage"] in closed_form else r["steps"] * 64 * 2
        assert r["samples_per_s"] * r["epoch_s"] == pytest.approx(seen, rel=1e-6)
        assert len(r["weights_sha"]) == 2 and r["weights_in_sync"], f"workers diverged at epoch {r['epoch']}: {r}"

    # The loss falls within every stage that has more than one epoch.
    for st in stages:
        srows = [r for r in rows if r["stage"] == st.name]
        assert len(srows) == st.epochs
        if st.epochs < 2:
            continue
        key = "train_loss" if "train_loss" in srows[0] else model.selection_metric.replace("val_", "train_")
        assert srows[-1][key] < srows[0][key], f"{variant} {st.name}: {key} did not fall: {srows}"

    # The selected model is the final stage's best epoch, and it is that epoch's Ray checkpoint.
    sel = model.selection_metric
    finals = [r for r in rows if r["stage"] == stages[-1].name]
    best = min(finals, key=lambda r: (r[sel], r["epoch"]))
    assert result.best_epoch == best["epoch"]
    ckpt_dir = _ray_run_dir(out) / f"epoch-{best['epoch']:04d}"
    state = load_checkpoint(ckpt_dir)
    assert set(state) >= {"model", "optimizers", "schedulers", "progress", "rng"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    kept = sorted(p.name for p in _ray_run_dir(out).glob("epoch-*"))
    assert len(kept) <= RunConfig().train.keep_checkpoints + 1  # the K best plus the latest
    assert f"epoch-{total:04d}" in kept  # the latest is always kept (resume continues from it)

    if variant == "pca":  # the closed-form fit from all-reduced moments = one process on all rows
        from raeflow.data import load_training_data

        data = load_training_data("digits")
        ref = build_model("pca", **model.config)
        ref.accumulate(torch.from_numpy(data.train.x))
        ref.finalize()
        assert torch.allclose(model.components, ref.components, atol=1e-4)
        assert torch.allclose(model.mean, ref.mean, atol=1e-6)
        with torch.no_grad():
            ref_val = float(ref(torch.from_numpy(data.val.x))["loss"])
        assert rows[0]["val_loss"] == pytest.approx(ref_val, rel=1e-4)  # the val loss of the local fit


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_worker_failure_restarts_from_latest_checkpoint(ray_local, tmp_path, monkeypatch):
    """A worker raising mid-epoch 2 is replaced; training continues from epoch 1's checkpoint, and
    metrics.jsonl ends with epochs 1..3 exactly once."""
    from raeflow.train.ray_engine import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV
    from raeflow.train.run import train

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    out = tmp_path / "run"
    cfg = _cfg("dae", out, epochs=3)
    cfg.ray.max_failures = 1
    logs: list[str] = []
    train(cfg, log=logs.append)

    assert marker.read_text().startswith("failed at epoch 2")
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["resumed_from"] == 1  # epoch 2 ran again from the checkpoint of epoch 1 ...
    assert "resumed_from" not in rows[0] and "resumed_from" not in rows[2]
    assert [line.split()[1] for line in logs if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]  # ... only it
    assert any("restored from checkpoint at epoch 1" in line for line in logs)
    assert all(r["weights_in_sync"] for r in rows)
    assert rows[2]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_streamed_run_resumes_after_driver_killed(ray_local, tmp_path):
    """`raeflow train` on a corpus streamed by Ray Data (data.read=stream: the driver never reads it; joining
    this session's Ray with --address) is SIGKILLed after 2+ epochs; `--resume` continues from the latest Ray
    checkpoint (same RunConfig name/storage), streams again and trains every epoch exactly once."""
    from raeflow.data.corpus import write_corpus
    from raeflow.data.core import in_validation, validation_fraction
    from raeflow.train.run import train

    corpus = write_corpus(tmp_path / "corpus", 800, chunk_rows=400, log=lambda s: None)
    n_train = int((~in_validation([f"corpus:{i}" for i in range(800)], validation_fraction(800, None))).sum())
    epochs = 5  # killed after 2, so the resumed run trains at least 3 more: enough to see none twice
    out = tmp_path / "run"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raeflow.cli.main", "train", "--variant", "ae", "--dataset", str(corpus), "--workers",
         "2", "--epochs", str(epochs), "-b", "64", "--set", "data.read=stream", "--set", "model.hidden=[32]",
         "-o", str(out), "--address", address],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(_rows(out)) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_before = len(_rows(out))
    assert 2 <= done_before < epochs

    # The dead driver's job (controller, workers, placement group) is cleaned up by Ray: wait for the CPUs.
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)

    cfg = RunConfig(output=str(out))
    cfg.ray.workers = 2
    logs: list[str] = []
    result = train(cfg, resume=True, log=logs.append)

    rows = _rows(out)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1
    start = resumed[0]["resumed_from"]
    assert resumed[0]["epoch"] == start + 1 and start >= 1
    assert sum(1 for line in logs if line.startswith("epoch ")) == epochs - start  # nothing trained twice
    assert any("data: streamed by Ray Data" in line for line in logs)
    assert any(f"train {n_train:,} / val {800 - n_train:,}" in line for line in logs)  # the id-hash split
    assert rows[-1]["steps"] == (n_train // 2) // 32  # 32 rows per worker per step: every streamed row, once
    assert all(r["weights_in_sync"] for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.epochs == epochs and math.isfinite(result.best)
    assert (out / "model" / "config.json").is_file()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_gpu_without_gpus_fails_at_once(ray_local, tmp_path):
    from typer.testing import CliRunner

    from raeflow.cli.main import app
    from raeflow.train.run import train

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    cfg = _cfg("ae", tmp_path / "run")
    cfg.ray.gpu = True
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"--gpu: the Ray cluster has no GPU"):
        train(cfg, log=lambda s: None)
    assert time.perf_counter() - t0 < 30  # no worker was started
    assert not (tmp_path / "run").exists()  # and no run directory made

    res = CliRunner().invoke(app, ["train", "--gpu", "--dataset", "digits", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 2
    assert "no GPU" in res.output
