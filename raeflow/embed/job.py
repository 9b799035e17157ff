"""``raeflow embed``: the Ray Data pipeline.

A source (:mod:`raeflow.data.sources`) reads and decodes inputs in Ray tasks; ``map_batches`` runs
:class:`~raeflow.embed.encoder.Encoder` in a pool of actors (each loads the model once; CPU or one GPU each);
the driver iterates the stream and commits Parquet files through :class:`~raeflow.embed.output.PartWriter`
(plain, no Ray: the file layout, atomic commits and resume rules are documented there).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa

from raeflow.artifact import TrainedModel
from raeflow.embed.output import (EmbedSummary, PartWriter, committed, count_rows, error_files, errors_schema,
                                  metadata, output_schema, part_files, prepare_output, rows_per_file,
                                  write_manifest)

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
    if todo != 0:
        from raeflow.raycluster import ensure_ray

        ensure_ray(address, log=log)
        n_workers, cpus, gpus, threads = resources(workers, gpu)
        log(f"embed: {'?' if todo is None else f'{todo:,}'} rows; {n_workers} encoder actor(s) x {cpus:g} CPU"
            + (f" + {gpus:g} GPU" if gpus else f", {threads} thread(s)") + f", batch {bs}")
        stream = _encoded_stream(source, done, md, n_workers, cpus, gpus, threads, bs, device)
        _consume(stream, writer, todo, progress)
    writer.close()
    total_embedded, total_errors = count_rows(part_files(out)), count_rows(error_files(out))
    summary = EmbedSummary(source.spec, str(out), writer.embedded + writer.errors, writer.embedded, writer.errors,
                           len(done), total_embedded, total_errors, len(writer.files), time.perf_counter() - t0,
                           n_workers, bs, device)
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
