"""Where ``raeflow embed``'s rows land: Parquet parts committed atomically, the errors table, the manifest.

Plain pyarrow, no Ray: :class:`PartWriter` takes any iterable of encoder output tables (the Ray job's stream, or a
test's list), so the commit, resume and accounting rules are tested without a cluster.

Why one committer: embeddings are small (a 30-float code is 120 bytes, ~1% of the MNIST image it came from), so
one writer costs little and makes the guarantees simple — every file is written under a hidden temporary name
and renamed into place when complete (a crash never leaves a half-written file that readers would see: pyarrow,
pandas and Ray skip names starting with ``.`` or ``_``), files are cut at a size chosen here rather than per Ray
block, and resume is exact: the ids in the committed files are the rows done.

Layout of ``OUT_DIR``::

    part-00000.parquet ...      id, embedding fixed_size_list<float32>[k][, logvar][, codes], label, source
                                (+ raeflow.* metadata)
    _errors/part-00000.parquet  id, error, source — inputs that could not be read or decoded
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
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raeflow.artifact import TrainedModel
from raeflow.embed.encoder import ERROR, ID, SOURCE, embedding_schema
from raeflow.version import __version__
from raeflow.errors import InputError, MissingFileError, RunExistsError

ERRORS_DIR = "_errors"
MANIFEST = "_raeflow_embed.json"
PART = "part-{:05d}.parquet"
#: Target size of an output file: big enough that a million 30-d codes make a handful of files, small enough to
#: read one file at a time.
TARGET_FILE_BYTES = 64 * 2**20
META_KEYS = ("raeflow.variant", "raeflow.model_sha256", "raeflow.version", "raeflow.input")


# ---------------------------------------------------------------------------------------- output files
def output_schema(encoder: Any, metadata: dict[str, str]) -> pa.Schema:
    """The embeddings files' schema: the encoder's columns (one definition, ``embedding_schema``) without the
    in-flight ``error`` column, with the ``raeflow.*`` provenance metadata."""
    return embedding_schema(encoder.latent_dim, encoder.capabilities, encoder.code_len, error=False,
                            metadata=metadata)


def errors_schema(metadata: dict[str, str]) -> pa.Schema:
    return pa.schema([pa.field(ID, pa.string(), nullable=False), pa.field(ERROR, pa.string(), nullable=False),
                      pa.field(SOURCE, pa.string())], metadata=metadata)


def rows_per_file(schema: pa.Schema) -> int:
    # fixed-size list columns (4-byte values) + id/label strings and offsets
    per_row = 48 + sum(4 * f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type))
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


def _column(files: list[Path], name: str, fallback: str | None = None) -> pa.Array:
    """One string column of ``files`` as one array; files written before the column existed give ``fallback``'s
    values (``source`` is new: older outputs' rows have their id as their position)."""
    parts = []
    for f in files:
        have = pq.read_schema(f).names
        t = pq.read_table(f, columns=list(dict.fromkeys(c for c in (name, fallback, ID) if c and c in have)))
        col = t.column(name) if name in t.column_names else t.column(fallback or ID)
        if fallback and name in t.column_names:
            col = pc.coalesce(col, t.column(fallback))
        parts.append(col.combine_chunks().cast(pa.string()))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def committed(out: Path) -> tuple[pa.Array, pa.Array]:
    """``(ids, sources)`` of what earlier runs committed: the embeddings' ids (a new row may not reuse one) and
    the sources of every committed row, embedded or error (the rows a resumed job skips)."""
    parts, errors = part_files(out), error_files(out)
    return _column(parts, ID), _column(parts + errors, SOURCE, fallback=ID)


def _source(t: pa.Table) -> pa.Array:
    """The rows' sources; a table without them (a direct caller's) has its ids as positions."""
    ids = t.column(ID).combine_chunks()
    if SOURCE not in t.column_names:
        return ids
    return pc.coalesce(t.column(SOURCE).combine_chunks(), ids)


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
        #: every id taken so far (committed before a resume, then written): the readers turn a repeated id into
        #: an error row within one file; this catches one repeated across files, which no reader task sees whole
        self.seen: set[str] = set()

    def already(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Ids embedded by an earlier run (resume): a new row may not reuse them either."""
        self.seen.update(i for i in ids.to_pylist() if i is not None)

    def add(self, table: pa.Table) -> tuple[int, int]:
        """Take one encoder output table; returns (embedded, errors) in it."""
        if SOURCE not in table.column_names:
            table = table.append_column(SOURCE, _source(table))
        table = self._repeats_to_errors(table)
        err = table.column(ERROR)
        bad = err.is_valid()
        n_bad = pc.sum(bad).as_py() or 0
        good = table.filter(pc.invert(bad)) if n_bad else table
        if n_bad:
            e = table.filter(bad)
            self._errors.append(e.select([ID, ERROR, SOURCE]).cast(self.err_schema))
        if good.num_rows:
            self._rows.append(good.select(self.schema.names).cast(self.schema))
            self._n += good.num_rows
        while self._n >= self.rows_per_file:
            self._flush(self.rows_per_file)
        return good.num_rows, n_bad

    def _repeats_to_errors(self, table: pa.Table) -> pa.Table:
        """Good rows whose id an earlier row (in this run, another file or block, or a committed part) already
        took become error rows: ``<id>#duplicate@<source>``, naming the id. The readers catch repeats within one
        file; only the writer sees every file. Resume skips by source, so such a row is re-read, not lost."""
        ids = table.column(ID).to_pylist()
        good = table.column(ERROR).is_null().to_pylist()
        fresh = [i for i, ok in zip(ids, good) if ok]
        if len(set(fresh)) == len(fresh) and self.seen.isdisjoint(fresh):
            self.seen.update(fresh)
            return table
        sources = _source(table).to_pylist()
        errors = table.column(ERROR).to_pylist()
        for k, (rid, ok) in enumerate(zip(ids, good)):
            if not ok:
                continue
            if rid in self.seen:
                ids[k] = f"{rid}#duplicate@{sources[k]}"
                errors[k] = f"{sources[k]}: duplicate id {rid!r} (an earlier row has it); ids must be unique"
            else:
                self.seen.add(rid)
        cols = {n: table.column(n) for n in table.column_names}
        cols[ID], cols[ERROR] = pa.array(ids, pa.string()), pa.array(errors, pa.string())
        return pa.table(cols, schema=table.schema)

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
    first_row_s: float | None = None  # from the job's start to its first encoded rows reaching the driver

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else math.nan

    def lines(self) -> list[str]:
        out = [f"rows in {self.rows_in:,} = embedded {self.embedded:,} + errors {self.errors:,}"
               + (f"  ({self.skipped:,} already done, skipped)" if self.skipped else ""),
               f"{self.rows_per_s:,.0f} rows/s over {self.seconds:.1f}s"
               + (f" (first rows after {self.first_row_s:.1f}s)" if self.first_row_s is not None else "")
               + f"; {self.workers} {'encoder actor(s)' if self.device != 'cpu' else 'task(s) at once'} on "
               f"{self.device}, batch {self.batch_size}; {self.files} file(s) written",
               f"{self.output}: {self.total_embedded:,} embeddings, {self.total_errors:,} errors in total"]
        if self.errors:
            out.append(f"errors: {Path(self.output) / ERRORS_DIR} (id, error, source)")
        return out


def metadata(art: TrainedModel, input_spec: str) -> dict[str, str]:
    """Provenance written into every file's schema: which model (by hash) embedded which input."""
    return {"raeflow.variant": art.variant, "raeflow.model_sha256": art.sha256,
            "raeflow.version": __version__, "raeflow.input": input_spec,
            "raeflow.model_dir": str(art.path.resolve())}


def check_resumable(out: Path, meta: dict[str, str]) -> None:
    files = part_files(out) + error_files(out)
    if not files:
        return
    old = pq.read_schema(files[0]).metadata or {}
    for key in ("raeflow.model_sha256", "raeflow.input"):
        was = old.get(key.encode(), b"").decode()
        if was != meta[key]:
            raise InputError(f"--resume: {out} was written with {key} = {was!r}, this job has {meta[key]!r}; "
                             "resume with the same model and input, or write to a new --output")


def prepare_output(out: Path, meta: dict[str, str], resume: bool, log: Callable[[str], None]) -> int:
    """Check or create OUT_DIR; returns the next part number. Leftover temporary files of a crashed run are
    removed (only this writer makes ``.part-*.tmp``)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = part_files(out) + error_files(out)
    if existing and not resume:
        raise RunExistsError(f"{out} already holds {len(existing)} embedding file(s): pass --resume to finish "
                              "that job, or choose a new --output")
    if resume:
        check_resumable(out, meta)
    stale = list(out.glob(".part-*.tmp")) + list((out / ERRORS_DIR).glob(".part-*.tmp"))
    for f in stale:
        f.unlink()
    if stale:
        log(f"removed {len(stale)} incomplete file(s) left by an interrupted run")
    return max((_part_number(p) for p in existing), default=-1) + 1


def count_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def write_manifest(out: Path, s: EmbedSummary, meta: dict[str, str], total: int | None) -> None:
    doc = {**meta, "input_rows": total, "embedded": s.total_embedded, "errors": s.total_errors,
           "last_run": {k: v for k, v in asdict(s).items() if k not in ("input", "output")} | {
               "rows_per_s": round(s.rows_per_s, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / MANIFEST)


def read_metadata(out: str | os.PathLike) -> dict[str, str]:
    """The ``raeflow.*`` schema metadata of an embeddings directory."""
    files = part_files(Path(out))
    if not files:
        raise MissingFileError(f"{out}: no part-*.parquet files (not a `raeflow embed` output)")
    md = pq.read_schema(files[0]).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"raeflow.")}
