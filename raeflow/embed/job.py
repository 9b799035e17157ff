"""``raeflow embed``: the Ray Data pipeline, and how its output is committed, resumed and accounted for.

Pipeline: a source (:mod:`raeflow.embed.sources`) reads and decodes inputs in Ray tasks; ``map_batches`` runs
:class:`~raeflow.embed.encoder.Encoder` in a pool of actors (each loads the model once; CPU or one GPU each);
the driver iterates the stream and commits Parquet files.

Why the driver writes: embeddings are small (a 30-float code is 120 bytes, ~1% of the MNIST image it came from),
so one committer costs little and makes the guarantees simple — every file is written under a hidden temporary
name and renamed into place when complete (a crash never leaves a half-written file that readers would see:
pyarrow, pandas and Ray skip names starting with ``.`` or ``_``), files are cut at a size chosen here rather than
per Ray block, and resume is exact: the ids in the committed files are the rows done.

Layout of ``OUT_DIR``::

    part-00000.parquet ...      id, embedding fixed_size_list<float32>[k], label[, logvar]   (+ raeflow.* metadata)
    _errors/part-00000.parquet  id, error — inputs that could not be read or decoded
    _raeflow_embed.json         totals and provenance, rewritten at the end of every run

The errors table lives in ``_errors/`` (not ``errors/``) because ``pyarrow.parquet.read_table(OUT_DIR)`` and
``pandas.read_parquet(OUT_DIR)`` recurse into sub-folders: an ``errors/`` folder would mix its rows (and its
schema) into the embeddings; a ``_`` prefix is the convention they skip.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

import raeflow
from raeflow.embed.encoder import EMBEDDING, ERROR, ID, LOGVAR, vector_type
from raeflow.io import model_dir, model_sha256, read_config

ERRORS_DIR = "_errors"
MANIFEST = "_raeflow_embed.json"
PART = "part-{:05d}.parquet"
#: Target size of an output file: big enough that a million 30-d codes make a handful of files, small enough to
#: read one file at a time.
TARGET_FILE_BYTES = 64 * 2**20
META_KEYS = ("raeflow.variant", "raeflow.model_sha256", "raeflow.version", "raeflow.input")


# ---------------------------------------------------------------------------------------- output files
def output_schema(latent_dim: int, logvar: bool, metadata: dict[str, str]) -> pa.Schema:
    fields = [pa.field(ID, pa.string(), nullable=False), pa.field(EMBEDDING, vector_type(latent_dim)),
              pa.field("label", pa.string())]
    if logvar:
        fields.append(pa.field(LOGVAR, vector_type(latent_dim)))
    return pa.schema(fields, metadata=metadata)


def errors_schema(metadata: dict[str, str]) -> pa.Schema:
    return pa.schema([pa.field(ID, pa.string(), nullable=False), pa.field(ERROR, pa.string(), nullable=False)],
                     metadata=metadata)


def rows_per_file(latent_dim: int, logvar: bool) -> int:
    per_row = 4 * latent_dim * (2 if logvar else 1) + 48  # floats + id/label strings and offsets
    return max(10_000, TARGET_FILE_BYTES // per_row)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write to a hidden temporary name beside ``path``, fsync, then rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, table.schema) as w:
        w.write_table(table, row_group_size=1 << 20)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def error_files(out: Path) -> list[Path]:
    return sorted((out / ERRORS_DIR).glob("part-*.parquet"))


def _part_number(p: Path) -> int:
    return int(p.stem.split("-", 1)[1])


def committed_ids(out: Path) -> pa.Array:
    """Ids in the committed embeddings and errors files: the rows a resumed job skips."""
    files = part_files(out) + error_files(out)
    if not files:
        return pa.array([], pa.string())
    ids = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=[ID]).column(ID)
    return ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())


class PartWriter:
    """Buffers encoder output and commits ``part-NNNNN.parquet`` files of ``rows_per_file`` rows.

    Error rows go to ``_errors/part-NNNNN.parquet``, committed *after* the embeddings file of the same number:
    a crash between the two loses only error rows, which a resume then re-reads and reports again — never a row
    twice. Plain class, no Ray: it takes any iterable of encoder output tables.
    """

    def __init__(self, out: Path, schema: pa.Schema, err_schema: pa.Schema, rows_per_file: int,
                 first_part: int = 0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.err_schema = err_schema
        self.rows_per_file = int(rows_per_file)
        self.next_part = first_part
        self._rows: list[pa.Table] = []
        self._n = 0
        self._errors: list[pa.Table] = []
        self.embedded = 0
        self.errors = 0
        self.files: list[Path] = []

    def add(self, table: pa.Table) -> tuple[int, int]:
        """Take one encoder output table; returns (embedded, errors) in it."""
        err = table.column(ERROR)
        bad = err.is_valid()
        n_bad = pc.sum(bad).as_py() or 0
        good = table.filter(pc.invert(bad)) if n_bad else table
        if n_bad:
            e = table.filter(bad)
            self._errors.append(pa.table({ID: e.column(ID), ERROR: e.column(ERROR)}).cast(self.err_schema))
        if good.num_rows:
            self._rows.append(good.select(self.schema.names).cast(self.schema))
            self._n += good.num_rows
        while self._n >= self.rows_per_file:
            self._flush(self.rows_per_file)
        return good.num_rows, n_bad

    def close(self) -> None:
        if self._n or self._errors:
            self._flush(self._n)

    def _flush(self, n: int) -> None:
        part = self.next_part
        self.next_part += 1
        if n:
            rows = pa.concat_tables(self._rows)
            head, rest = rows.slice(0, n), rows.slice(n)
            path = self.out / PART.format(part)
            write_atomic(head.combine_chunks(), path)
            self.files.append(path)
            self.embedded += n
            self._rows, self._n = ([rest] if rest.num_rows else []), rest.num_rows
        if self._errors:
            errs = pa.concat_tables(self._errors)
            (self.out / ERRORS_DIR).mkdir(exist_ok=True)
            path = self.out / ERRORS_DIR / PART.format(part)
            write_atomic(errs, path)
            self.files.append(path)
            self.errors += errs.num_rows
            self._errors = []


# ------------------------------------------------------------------------------------------------ job
@dataclass
class EmbedSummary:
    input: str
    output: str
    rows_in: int  # rows this run read: embedded + errors
    embedded: int
    errors: int
    skipped: int  # already committed by an earlier run (resume)
    total_embedded: int  # in OUT_DIR after this run
    total_errors: int
    files: int  # files this run committed
    seconds: float
    workers: int
    batch_size: int
    device: str

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else math.nan

    def lines(self) -> list[str]:
        out = [f"rows in {self.rows_in:,} = embedded {self.embedded:,} + errors {self.errors:,}"
               + (f"  ({self.skipped:,} already done, skipped)" if self.skipped else ""),
               f"{self.rows_per_s:,.0f} rows/s over {self.seconds:.1f}s; {self.workers} encoder actor(s) on "
               f"{self.device}, batch {self.batch_size}; {self.files} file(s) written",
               f"{self.output}: {self.total_embedded:,} embeddings, {self.total_errors:,} errors in total"]
        if self.errors:
            out.append(f"errors: {Path(self.output) / ERRORS_DIR} (id, error)")
        return out


def _metadata(md: Path, cfg: dict[str, Any], input_spec: str) -> dict[str, str]:
    return {"raeflow.variant": cfg["variant"], "raeflow.model_sha256": model_sha256(md),
            "raeflow.version": raeflow.__version__, "raeflow.input": input_spec,
            "raeflow.model_dir": str(md.resolve())}


def _check_resumable(out: Path, meta: dict[str, str]) -> None:
    files = part_files(out) + error_files(out)
    if not files:
        return
    old = pq.read_schema(files[0]).metadata or {}
    for key in ("raeflow.model_sha256", "raeflow.input"):
        was = old.get(key.encode(), b"").decode()
        if was != meta[key]:
            raise ValueError(f"--resume: {out} was written with {key} = {was!r}, this job has {meta[key]!r}; "
                             "resume with the same model and input, or write to a new --output")


def _prepare_output(out: Path, meta: dict[str, str], resume: bool, log: Callable[[str], None]) -> int:
    """Check or create OUT_DIR; returns the next part number. Leftover temporary files of a crashed run are
    removed (only this writer makes ``.part-*.tmp``)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = part_files(out) + error_files(out)
    if existing and not resume:
        raise FileExistsError(f"{out} already holds {len(existing)} embedding file(s): pass --resume to finish "
                              "that job, or choose a new --output")
    if resume:
        _check_resumable(out, meta)
    stale = list(out.glob(".part-*.tmp")) + list((out / ERRORS_DIR).glob(".part-*.tmp"))
    for f in stale:
        f.unlink()
    if stale:
        log(f"removed {len(stale)} incomplete file(s) left by an interrupted run")
    return max((_part_number(p) for p in existing), default=-1) + 1


def _count_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def resources(workers: int | None, gpu: bool) -> tuple[int, float, float, int]:
    """(actors, CPUs per actor, GPUs per actor, torch threads per actor) for the connected Ray cluster."""
    import ray

    from raeflow.raycluster import plan_workers

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if workers is None:
        # CPU: one actor per core, keeping one core for reading/decoding (the plan below keeps it free).
        # (at least 1 with --gpu too, so a cluster without GPUs gets plan_workers' "no GPU" message)
        workers = max(1, int(gpus)) if gpu else max(1, int(cpus) - 1)
    plan = plan_workers(workers, cpus, gpus, use_gpu=gpu)
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")))
    # Intra-op threads: a node's cores shared by the actors on it (placement spreads them evenly enough).
    per_node_cpus = cpus / nodes
    threads = 1 if gpu else max(1, int(per_node_cpus // max(1, math.ceil(workers / nodes))))
    return workers, plan.cpus_per_worker, plan.gpus_per_worker, threads


def run_embed(model: str | os.PathLike, input: str, output: str | os.PathLike, *, workers: int | None = None,
              gpu: bool = False, batch_size: int | None = None, id_column: str | None = None,
              text_column: str | None = None, image_column: str | None = None, label_column: str | None = "label",
              resume: bool = False, file_rows: int | None = None, address: str | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> EmbedSummary:
    """Embed every row of ``input`` with ``model`` into the Parquet dataset ``output`` (see module docstring)."""
    from raeflow.embed.sources import Prep, open_source

    t0 = time.perf_counter()
    md = model_dir(model)
    cfg = read_config(md)
    prep = Prep.from_config(cfg)
    source = open_source(input, prep, id_column=id_column, text_column=text_column, image_column=image_column,
                         label_column=label_column)
    latent = int(cfg["model"].get("latent_dim") or _latent_of(md))
    logvar = _has_logvar(cfg["variant"])
    meta = _metadata(md, cfg, source.spec)
    out = Path(output)
    first_part = _prepare_output(out, meta, resume, log)
    done = committed_ids(out) if resume else pa.array([], pa.string())
    todo = source.todo(done)
    schema = output_schema(latent, logvar, meta)
    writer = PartWriter(out, schema, errors_schema(meta), file_rows or rows_per_file(latent, logvar), first_part)
    log(f"embed: {source.spec} ({source.kind}) with {cfg['variant']} {md} (sha256 {meta['raeflow.model_sha256'][:12]})"
        + (f"; {len(done):,} rows already done" if len(done) else ""))
    n_workers, bs, device = 0, int(batch_size or (4096 if gpu else 1024)), "cuda" if gpu else "cpu"
    if todo != 0:
        from raeflow.raycluster import ensure_ray

        ensure_ray(address, log=log)
        n_workers, cpus, gpus, threads = resources(workers, gpu)
        log(f"embed: {'?' if todo is None else f'{todo:,}'} rows; {n_workers} encoder actor(s) x {cpus:g} CPU"
            + (f" + {gpus:g} GPU" if gpus else f", {threads} thread(s)") + f", batch {bs}")
        stream = _encoded_stream(source, done, md, n_workers, cpus, gpus, threads, bs, device)
        _consume(stream, writer, todo, progress)
    writer.close()
    total_embedded, total_errors = _count_rows(part_files(out)), _count_rows(error_files(out))
    summary = EmbedSummary(source.spec, str(out), writer.embedded + writer.errors, writer.embedded, writer.errors,
                           len(done), total_embedded, total_errors, len(writer.files), time.perf_counter() - t0,
                           n_workers, bs, device)
    if todo is not None and summary.rows_in != todo:
        raise RuntimeError(f"{todo:,} rows were to be embedded but {summary.rows_in:,} came out of the pipeline; "
                           f"{out} holds what was committed: re-run with --resume")
    _write_manifest(out, summary, meta, source.total)
    for line in summary.lines():
        log(line)
    return summary


class EncoderActor:
    """The encoder as a Ray actor: :class:`~raeflow.embed.encoder.Encoder` in a process whose allocator is
    first kept from hoarding freed buffers (see :func:`~raeflow.embed.sources.bounded_malloc`)."""

    def __init__(self, **kwargs: Any):
        from raeflow.embed.encoder import Encoder
        from raeflow.embed.sources import bounded_malloc

        bounded_malloc()
        self.encoder = Encoder(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encoder(batch)


def _encoded_stream(source, done: pa.Array, md: Path, workers: int, cpus: float, gpus: float, threads: int,
                    batch_size: int, device: str) -> Iterable[pa.Table]:
    import ray.data

    ds = source.dataset(done).map_batches(
        EncoderActor, fn_constructor_kwargs={"model": str(md), "device": device, "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus or None,
        batch_size=batch_size, batch_format="pyarrow")
    # batch_size=None: take Ray's output blocks as they come (the writer re-cuts them into files).
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _consume(stream: Iterable[pa.Table], writer: PartWriter, todo: int | None, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="rows", unit_scale=True, disable=not progress, smoothing=0.1, mininterval=0.5,
               desc="embed")
    errors = 0
    try:
        for table in stream:
            _, bad = writer.add(table)
            errors += bad
            bar.update(table.num_rows)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()


def _write_manifest(out: Path, s: EmbedSummary, meta: dict[str, str], total: int | None) -> None:
    doc = {**meta, "input_rows": total, "embedded": s.total_embedded, "errors": s.total_errors,
           "last_run": {k: v for k, v in asdict(s).items() if k not in ("input", "output")} | {
               "rows_per_s": round(s.rows_per_s, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / MANIFEST)


def _latent_of(md: Path) -> int:
    from raeflow.io import load_model

    return int(load_model(md).latent_dim)


def _has_logvar(variant: str) -> bool:
    from raeflow.registry import get_variant

    return callable(getattr(get_variant(variant).cls, "encode_stats", None))


def read_metadata(out: str | os.PathLike) -> dict[str, str]:
    """The ``raeflow.*`` schema metadata of an embeddings directory."""
    files = part_files(Path(out))
    if not files:
        raise FileNotFoundError(f"{out}: no part-*.parquet files (not a `raeflow embed` output)")
    md = pq.read_schema(files[0]).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"raeflow.")}
