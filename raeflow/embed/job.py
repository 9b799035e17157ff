"""``raeflow embed``: the Ray Data pipeline.

A source (:mod:`raeflow.data.sources`) reads and decodes inputs; :class:`~raeflow.embed.encoder.Encoder` encodes
them; the driver iterates the stream and commits Parquet files through :class:`~raeflow.embed.output.PartWriter`
(plain, no Ray: the file layout, atomic commits and resume rules are documented there).

On CPUs the reading and the encoding run fused in Ray *tasks*, one unit of the source (a Parquet row group, a
chunk of paths) per task, one torch thread and one CPU each, so every core runs its own read-decode-encode loop
and no core idles while another does Python work; :func:`encode_block` keeps one loaded model per worker
process. With ``--gpu`` an actor pool holds one model per GPU (:class:`EncoderActor`) and the reads stay in CPU
tasks that feed it. BENCHMARKS.md has the measurements behind both choices.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa

from raeflow.artifact import TrainedModel
from raeflow.embed.output import (EmbedSummary, PartWriter, committed, count_rows, error_files, errors_schema,
                                  metadata, output_schema, part_files, prepare_output, rows_per_file,
                                  write_manifest)

#: Size of the blocks the encoded rows leave a task in (~7k rows of a 30-d code). Ray Data's default (128 MiB)
#: held a whole 300k-row job's embeddings in one block until its last row: the driver committed nothing, and
#: the first row reached it at the very end (measured: 17.9 s into an 18.3 s job).
OUTPUT_BLOCK_BYTES = 1 * 2**20


def resources(workers: int | None, gpu: bool) -> tuple[int, float, float, int]:
    """(workers, CPUs per worker, GPUs per worker, torch threads per worker) for the connected Ray cluster: on
    CPUs, one-thread tasks, one per CPU by default; with a GPU, one actor per GPU."""
    import ray

    from raeflow.raycluster import plan_workers

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if not gpu:
        n = max(1, int(cpus)) if workers is None else int(workers)
        if n < 1:
            from raeflow.errors import InputError

            raise InputError(f"--workers {n}: needs at least 1")
        return n, 1.0, 0.0, 1
    # (at least 1 with --gpu, so a cluster without GPUs gets plan_workers' "no GPU" message)
    workers = max(1, int(gpus)) if workers is None else workers
    plan = plan_workers(workers, cpus, gpus, use_gpu=gpu)
    return workers, plan.cpus_per_worker, plan.gpus_per_worker, 1  # one CPU thread: the GPU does the work


def run_embed(model: "str | os.PathLike | TrainedModel", input: str, output: str | os.PathLike, *, workers: int | None = None,
              gpu: bool = False, batch_size: int | None = None, id_column: str | None = None,
              text_column: str | None = None, image_column: str | None = None, label_column: str | None = "label",
              resume: bool = False, file_rows: int | None = None, address: str | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> EmbedSummary:
    """Embed every row of ``input`` with ``model`` into the Parquet dataset ``output`` (see module docstring)."""
    from raeflow.data.sources import Prep, open_source

    from raeflow.embed.encoder import Encoder

    t0 = time.perf_counter()
    art = TrainedModel.load(model)
    encoder = Encoder(art)  # on the driver only for the output columns; the actors load their own
    prep = Prep.from_artifact(art)
    source = open_source(input, prep, id_column=id_column, text_column=text_column, image_column=image_column,
                         label_column=label_column)
    meta = metadata(art, source.spec)
    out = Path(output)
    first_part = prepare_output(out, meta, resume, log)
    # done: the sources of the rows committed (the readers skip them); taken: the ids embedded (not to reuse)
    taken, done = committed(out) if resume else (pa.array([], pa.string()),) * 2
    todo = source.todo(done)
    schema = output_schema(encoder, meta)
    writer = PartWriter(out, schema, errors_schema(meta), file_rows or rows_per_file(schema), first_part)
    writer.already(taken)
    md = art.path
    log(f"embed: {source.spec} ({source.kind}) with {art.variant} {md} (sha256 {meta['raeflow.model_sha256'][:12]})"
        + (f"; {len(done):,} rows already done" if len(done) else ""))
    n_workers, bs, device = 0, int(batch_size or (4096 if gpu else 1024)), "cuda" if gpu else "cpu"
    first_row_s = None
    if todo != 0:
        from raeflow.raycluster import ensure_ray

        ensure_ray(address, log=log)
        n_workers, cpus, gpus, threads = resources(workers, gpu)
        log(f"embed: {'?' if todo is None else f'{todo:,}'} rows; "
            + (f"{n_workers} encoder actor(s) x {cpus:g} CPU + {gpus:g} GPU" if gpus else
               f"up to {n_workers} encoding task(s) at once, 1 CPU and {threads} thread each") + f", batch {bs}")
        stream = _encoded_stream(source, done, md, meta["raeflow.model_sha256"], n_workers, cpus, gpus, threads, bs,
                                 device)
        first = _consume(stream, writer, todo, progress)
        first_row_s = None if first is None else first - t0
    writer.close()
    total_embedded, total_errors = count_rows(part_files(out)), count_rows(error_files(out))
    summary = EmbedSummary(source.spec, str(out), writer.embedded + writer.errors, writer.embedded, writer.errors,
                           len(done), total_embedded, total_errors, len(writer.files), time.perf_counter() - t0,
                           n_workers, bs, device, None if first_row_s is None else round(first_row_s, 2))
    if todo is not None and summary.rows_in != todo:
        raise RuntimeError(f"{todo:,} rows were to be embedded but {summary.rows_in:,} came out of the pipeline; "
                           f"{out} holds what was committed: re-run with --resume")
    write_manifest(out, summary, meta, source.total)
    for line in summary.lines():
        log(line)
    return summary


class EncoderActor:
    """The encoder as a Ray actor: :class:`~raeflow.embed.encoder.Encoder` in a process whose allocator is
    first kept from hoarding freed buffers (see :func:`~raeflow.data.readers.bounded_malloc`)."""

    def __init__(self, **kwargs: Any):
        from raeflow.embed.encoder import Encoder
        from raeflow.data.readers import bounded_malloc

        bounded_malloc()
        self.encoder = Encoder(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encoder(batch)


#: One loaded encoder per Ray worker process: Ray runs task after task in the same idle workers, and loading the
#: model per task would cost more than encoding a small block.
_ENCODERS: dict[tuple, Any] = {}


def encode_block(batch: pa.Table, *, model: str, sha256: str, device: str, threads: int, chunk: int) -> pa.Table:
    """A CPU task's step: one block of decoded rows -> its embedding rows, by this process's cached encoder
    (keyed by the weights' sha256 as well, so a model rewritten under the same path is loaded afresh)."""
    key = (model, sha256, device, threads, chunk)
    enc = _ENCODERS.get(key)
    if enc is None:
        from raeflow.data.readers import bounded_malloc
        from raeflow.embed.encoder import Encoder

        bounded_malloc()
        _ENCODERS.clear()
        enc = _ENCODERS[key] = Encoder(model, device=device, threads=threads, chunk=chunk)
    return enc(batch)


def _encoded_stream(source, done: pa.Array, md: Path, sha256: str, workers: int, cpus: float, gpus: float,
                    threads: int, batch_size: int, device: str) -> Iterable[pa.Table]:
    import ray.data

    if gpus:
        ds = source.dataset(done).map_batches(
            EncoderActor, fn_constructor_kwargs={"model": str(md), "device": device, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
            batch_size=batch_size, batch_format="pyarrow")
    else:
        # batch_size=None: each task reads one unit of the source (a row group, a chunk of paths) and encodes its
        # blocks as the reader cuts them; the encoder chunks them by batch_size itself. A batch size here would
        # make Ray bundle that many units into one task (measured: all five row groups of a 300k-row file went
        # to one task while the second core idled).
        ds = source.dataset(done).map_batches(
            encode_block, fn_kwargs={"model": str(md), "sha256": sha256, "device": device, "threads": threads,
                                     "chunk": batch_size},
            num_cpus=cpus, batch_size=None, batch_format="pyarrow")
        # At most `workers` tasks at once, by a CPU limit on the whole execution: a TaskPoolStrategy(size=...)
        # here would stop Ray fusing the read into the encoding (measured: the pixels then went through the
        # object store in 1 MiB blocks, 220 tasks for 300k rows, and the job took twice as long).
        ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
            cpu=workers * cpus)
        # Only here: the setting cuts every operator's output, and on this path the only output is the encoded
        # rows (the read is fused in). With --gpu it would also cut the decoded images on their way to the
        # actors into 1 MiB objects, so that path keeps Ray's default.
        ds.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    # batch_size=None: take Ray's output blocks as they come (the writer re-cuts them into files).
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _consume(stream: Iterable[pa.Table], writer: PartWriter, todo: int | None, progress: bool) -> float | None:
    """Commit the stream's rows; returns when (``time.perf_counter``) its first rows arrived, None if none did."""
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="rows", unit_scale=True, disable=not progress, smoothing=0.1, mininterval=0.5,
               desc="embed")
    errors, first = 0, None
    try:
        for table in stream:
            first = first or time.perf_counter()
            _, bad = writer.add(table)
            errors += bad
            bar.update(table.num_rows)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
    return first
