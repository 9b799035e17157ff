"""``raeflow embed``: the encoder, the sources, atomic part files, and the Ray Data job end to end.

Real parts: small models trained here on scikit-learn digits and Reuters-R8, real PNG / text / Parquet / JSONL
corpora written to temporary folders (with a corrupt image, an image of another size, an empty and a non-UTF-8
document), the session's local Ray (``ray_local``). Every job's embeddings are compared with calling the
encoder directly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raeflow.data.decode import decode_image
from raeflow.embed import output as jobmod
from raeflow.embed.encoder import Encoder
from raeflow.embed.encoder import embedding_schema
from raeflow.embed.job import run_embed
from raeflow.embed.output import ERRORS_DIR, META_KEYS, PartWriter, errors_schema
from raeflow.data.readers import Prep, array_images, decode_image_files, read_jsonl, read_text_files
from raeflow.io import model_sha256

REPO = Path(__file__).resolve().parents[1]
DOCS = ["the bank raised interest rates on loans", "oil prices fell as crude supply grew",
        "the company reported quarterly profit and revenue", "wheat and grain exports rose this year",
        "shares of the bank rose after the profit report", "crude oil output was cut by producers"]


@pytest.fixture(scope="module")
def digits_ae(embed_digits_ae) -> str:
    return embed_digits_ae


@pytest.fixture(scope="module")
def digits_vae(embed_digits_vae) -> str:
    return embed_digits_vae


@pytest.fixture(scope="module")
def doc_ae(embed_doc_ae) -> str:
    return embed_doc_ae


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 digits as PNG in class folders, one 16x16 image (resized on the way in) and one corrupt file."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("imgs")
    for i in range(24):
        _png(root / str(d.target[i]) / f"img{i:02d}.png", np.rint(d.images[i] * 255 / 16))
    big = Image.fromarray(np.rint(d.images[30] * 255 / 16).astype(np.uint8)).resize((16, 16))
    big.save(root / "3" / "big16.png")
    (root / "7" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "7" / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for i, doc in enumerate(DOCS):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 prices rose".encode("latin-1"))
    return root


def _emb(table: pa.Table, col: str = "embedding") -> np.ndarray:
    a = table.column(col).combine_chunks()
    return a.flatten().to_numpy().reshape(len(a), a.type.list_size)


def _by_id(out: Path) -> pa.Table:
    t = pq.read_table(out)  # plain pyarrow, no Ray: the schema must be portable
    return t.take(pa.compute.sort_indices(t, [("id", "ascending")]))


# ------------------------------------------------------------------------------------------ no Ray needed
def test_encoder_equals_the_model_and_passes_error_rows_through(digits_ae):
    from raeflow.io import load_model

    enc = Encoder(digits_ae)
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    out = enc({"id": [f"r{i}" for i in range(5)], "x": x, "error": [None, "r1: broken", None, None, None],
               "label": ["a", None, "b", "c", "d"]})
    t = out.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 6 and t.value_type == pa.float32()
    assert out.column("embedding").null_count == 1 and out.column("embedding")[1].as_py() is None
    with torch.no_grad():
        want = load_model(digits_ae).encode(torch.from_numpy(x)).numpy()
    got = _emb(out.filter(pa.compute.is_null(out.column("error"))))
    np.testing.assert_allclose(got, want[[0, 2, 3, 4]], rtol=1e-5, atol=1e-6)
    assert out.column("label").to_pylist() == ["a", None, "b", "c", "d"]
    # uint8 pixels are bytes / 255, exactly as the data layer scales them
    u8 = np.rint(x * 255).astype(np.uint8)
    np.testing.assert_array_equal(_emb(enc({"id": list("abcde"), "x": u8})),
                                  enc.encode_array(u8.astype(np.float32) / np.float32(255))[0])
    with pytest.raises(ValueError, match="64 values per row"):
        enc.encode_array(np.zeros((2, 10), np.float32))


def test_encoder_documents_and_vae_logvar(doc_ae, digits_vae):
    from raeflow.data.text import Vectoriser
    from raeflow.io import load_model, read_vectoriser

    enc = Encoder(doc_ae)
    out = enc({"id": ["a", "b"], "text": DOCS[:2]})
    vec = Vectoriser.from_json(read_vectoriser(doc_ae))
    with torch.no_grad():
        want = load_model(doc_ae).encode(torch.from_numpy(vec.transform(DOCS[:2]))).numpy()
    np.testing.assert_allclose(_emb(out), want, rtol=1e-5, atol=1e-6)
    assert "logvar" not in out.column_names

    vae = Encoder(digits_vae)
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    out = vae({"id": ["a", "b", "c"], "x": x})
    with torch.no_grad():
        mu, logvar = load_model(digits_vae).encode_stats(torch.from_numpy(x))
    np.testing.assert_allclose(_emb(out), mu.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_emb(out, "logvar"), logvar.numpy(), rtol=1e-5, atol=1e-6)
    assert out.schema.field("logvar").type == out.schema.field("embedding").type


def test_sources_turn_bad_inputs_into_error_rows(image_folder, text_folder, tmp_path):
    prep = Prep("image", (1, 8, 8))
    rels = ["0/img00.png", "3/big16.png", "7/corrupt.png", "9/missing.png"]
    t = decode_image_files(pa.table({"path": rels}), root=str(image_folder), prep=prep, labelled=True)
    assert t.column("id").to_pylist() == rels
    assert t.column("label").to_pylist() == ["0", "3", "7", "9"]
    err = t.column("error").to_pylist()
    assert err[0] is None and err[1] is None
    assert err[2].startswith("7/corrupt.png: not a readable image")
    assert err[3].startswith("9/missing.png: cannot read")
    x = t.column("x").combine_chunks()
    assert x.type.list_size == 64 and x.null_count == 2
    want = decode_image((image_folder / "3/big16.png").read_bytes(), (8, 8), "L")  # resized 16x16 -> 8x8
    np.testing.assert_array_equal(np.asarray(x[1].as_py(), np.float32), want.reshape(-1))

    t = read_text_files(pa.table({"path": ["doc0.txt", "empty.txt", "latin1.txt"]}), root=str(text_folder),
                        labelled=False)
    err = t.column("error").to_pylist()
    assert err[0] is None and t.column("text")[0].as_py() == DOCS[0]
    assert err[1] == "empty.txt: empty document"
    assert err[2].startswith("latin1.txt: not UTF-8 text") and str(text_folder) not in err[2]

    col = pa.array([[0] * 64, [255] * 64, [1] * 10, None], pa.list_(pa.uint8()))
    x, errors = array_images(col, ["r0", "r1", "r2", "r3"], prep, np.uint8)
    assert errors[:2] == [None, None] and x[1].max() == 255 and x.dtype == np.uint8
    assert "wrong shape: 10 values" in errors[2] and "no image" in errors[3]
    floats = pa.array([[0.5] * 64, [1.5] * 64, [float("nan")] * 64], pa.list_(pa.float32(), 64))
    x, errors = array_images(floats, ["a", "b", "c"], prep, np.float32)
    assert errors[0] is None and np.allclose(x[0], 0.5)
    assert "in [0, 1]" in errors[1] and "in [0, 1]" in errors[2]

    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "oil prices", "label": "crude"}\n\n{"text": ""}\nnot json\n{"id": "x9", "text": "grain"}\n')
    (t,) = list(read_jsonl(pa.table({"path": [str(jl)]}), text_field="text", id_field="id", label_field="label",
                           done=None))
    assert t.column("id").to_pylist() == ["0", "1", "2", "x9"]  # blank lines are not documents
    err = t.column("error").to_pylist()
    assert err[0] is None and err[3] is None and t.column("label")[0].as_py() == "crude"
    assert err[1] == "d.jsonl:3: empty document" and err[2].startswith("d.jsonl:4: not valid JSON")


def test_part_writer_commits_whole_files_and_errors_after_rows(tmp_path):
    meta = {"raeflow.input": "x"}
    w = PartWriter(tmp_path, embedding_schema(3, frozenset({"encode"}), error=False, metadata=meta), errors_schema(meta), rows_per_file=4)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(30, dtype=np.float32)), 3)
    err = [None] * 10
    err[2] = "bad"
    t = pa.table({"id": [str(i) for i in range(10)], "embedding": vec, "label": [None] * 10, "error": err})
    assert w.add(t) == (9, 1)
    assert [p.name for p in jobmod.part_files(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]
    # errors pending at a flush are committed with (after) that file: part 0 here
    assert [p.name for p in jobmod.error_files(tmp_path)] == ["part-00000.parquet"]
    w.close()
    assert [pq.read_metadata(p).num_rows for p in jobmod.part_files(tmp_path)] == [4, 4, 1]
    assert pq.read_table(tmp_path / ERRORS_DIR).to_pylist() == [{"id": "2", "error": "bad", "source": "2"}]
    assert not list(tmp_path.rglob(".*.tmp"))
    assert pq.read_table(tmp_path).num_rows == 9  # `_errors/` is not read as data
    taken, done = jobmod.committed(tmp_path)
    assert sorted(taken.to_pylist()) == sorted(str(i) for i in range(10) if i != 2)  # embedded ids only
    assert sorted(done.to_pylist()) == sorted(str(i) for i in range(10))  # every row committed, by source


def test_cluster_yaml_matches_ray_schema():
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    # What `ray up` itself runs before touching a cloud: fill the provider's defaults, validate again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU")]
    assert gpu and types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " && ".join(cfg["setup_commands"])
    assert setup.index("torch") < setup.index("raeflow")


def test_jobs_document_their_arguments():
    for job in ("embed_mnist.py", "embed_20newsgroups.py"):
        r = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--help"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert "--model" in r.stdout and "--output" in r.stdout and "ray job submit" in r.stdout


# ------------------------------------------------------------------------------------------ the Ray job
def _quiet(*_):
    pass


@pytest.mark.ray
def test_embed_image_folder_then_crash_and_resume(ray_local, digits_ae, digits_vae, image_folder, tmp_path):
    out = tmp_path / "emb"
    s = run_embed(digits_ae, str(image_folder), out, workers=1, batch_size=8, file_rows=6, progress=False,
                  log=_quiet)
    assert (s.rows_in, s.embedded, s.errors) == (26, 25, 1)
    full = _by_id(out)
    assert full.num_rows == 25 and "7/corrupt.png" not in full.column("id").to_pylist()
    t = full.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 6 and t.value_type == pa.float32()
    meta = {k.decode(): v.decode() for k, v in full.schema.metadata.items()}
    assert set(META_KEYS) <= set(meta)
    assert meta["raeflow.variant"] == "ae" and meta["raeflow.model_sha256"] == model_sha256(digits_ae)
    assert meta["raeflow.input"] == str(image_folder.resolve())
    ids = full.column("id").to_pylist()
    assert full.column("label").to_pylist() == [i.split("/")[0] for i in ids]
    errs = pq.read_table(out / ERRORS_DIR).to_pylist()
    assert len(errs) == 1 and errs[0]["id"] == "7/corrupt.png" and "not a readable image" in errs[0]["error"]
    x = np.stack([decode_image((image_folder / i).read_bytes(), (8, 8), "L") for i in ids])  # big16 resized
    np.testing.assert_allclose(_emb(full), Encoder(digits_ae).encode_array(x)[0], rtol=1e-5, atol=1e-6)
    manifest = json.loads((out / "_raeflow_embed.json").read_text())
    assert (manifest["input_rows"], manifest["embedded"], manifest["errors"]) == (26, 25, 1)
    parts = jobmod.part_files(out)
    assert [pq.read_metadata(p).num_rows for p in parts] == [6, 6, 6, 6, 1]  # files cut by the writer

    # The crash: one committed file lost, a half-written temporary file left behind.
    lost = pq.read_table(parts[1]).column("id").to_pylist()
    parts[1].unlink()
    (out / ".part-00007.parquet.tmp").write_bytes(b"PAR1 half a file")
    with pytest.raises(FileExistsError, match="--resume"):
        run_embed(digits_ae, str(image_folder), out, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="model_sha256"):  # another model's codes must not be mixed in
        run_embed(digits_vae, str(image_folder), out, resume=True, progress=False, log=_quiet)
    s = run_embed(digits_ae, str(image_folder), out, workers=1, batch_size=8, resume=True, progress=False,
                  log=_quiet)
    assert (s.rows_in, s.embedded, s.errors, s.skipped) == (6, 6, 0, 20) and sorted(lost) == sorted(
        pq.read_table(jobmod.part_files(out)[-1]).column("id").to_pylist())
    assert not list(out.glob(".*.tmp"))
    again = _by_id(out)
    assert again.column("id").to_pylist() == ids  # every id exactly once
    np.testing.assert_allclose(_emb(again), _emb(full), rtol=1e-6)
    assert pq.read_table(out / ERRORS_DIR).num_rows == 1
    nothing = run_embed(digits_ae, str(image_folder), out, resume=True, progress=False, log=_quiet)
    assert (nothing.rows_in, nothing.skipped, nothing.total_embedded, nothing.total_errors) == (0, 26, 25, 1)


@pytest.mark.ray
def test_embed_text_folder(ray_local, doc_ae, text_folder, tmp_path):
    out = tmp_path / "emb"
    s = run_embed(doc_ae, str(text_folder), out, workers=1, progress=False, log=_quiet)
    assert (s.rows_in, s.embedded, s.errors) == (8, 6, 2)
    t = _by_id(out)
    assert t.column("id").to_pylist() == [f"doc{i}.txt" for i in range(6)]
    assert t.column("label").null_count == 6
    np.testing.assert_allclose(_emb(t), Encoder(doc_ae).encode_texts(DOCS)[0], rtol=1e-5, atol=1e-6)
    errs = {r["id"]: r["error"] for r in pq.read_table(out / ERRORS_DIR).to_pylist()}
    assert set(errs) == {"empty.txt", "latin1.txt"} and "not UTF-8" in errs["latin1.txt"]
    with pytest.raises(ValueError, match="no GPU"):  # --gpu on a cluster without one fails before any work
        run_embed(doc_ae, str(text_folder), tmp_path / "gpu", gpu=True, progress=False, log=_quiet)


@pytest.mark.ray
def test_embed_parquet_builtin_and_vae(ray_local, digits_ae, digits_vae, tmp_path):
    from raeflow.data.images import load_digits

    raw = load_digits("test")
    pixels = np.rint(raw.x[:40].reshape(40, -1) * 255).astype(np.uint8)
    rows = [p.tolist() for p in pixels] + [[1, 2, 3]]
    pq.write_table(pa.table({"image": pa.array(rows, pa.list_(pa.uint8())),
                             "key": [f"k{i}" for i in range(41)], "label": [str(v) for v in raw.y[:40]] + ["x"]}),
                   tmp_path / "digits.parquet", row_group_size=16)
    out = tmp_path / "pq"
    s = run_embed(digits_ae, str(tmp_path / "digits.parquet"), out, id_column="key", workers=1, progress=False,
                  log=_quiet)
    assert (s.rows_in, s.embedded, s.errors) == (41, 40, 1)
    t = _by_id(out)
    order = np.argsort([f"k{i}" for i in range(40)])
    want = Encoder(digits_ae).encode_array(pixels.astype(np.float32) / np.float32(255))[0]
    np.testing.assert_allclose(_emb(t), want[order], rtol=1e-5, atol=1e-6)
    assert pq.read_table(out / ERRORS_DIR).to_pylist()[0]["id"] == "k40"

    out = tmp_path / "vae"
    s = run_embed(digits_vae, "digits:test", out, workers=1, progress=False, log=_quiet)
    assert (s.rows_in, s.embedded, s.errors) == (300, 300, 0)
    t = pq.read_table(out)
    idx = np.array([int(i.rsplit(":", 1)[1]) for i in t.column("id").to_pylist()])
    assert sorted(idx.tolist()) == list(range(300)) and t.column("id")[0].as_py().startswith("digits:test:")
    assert t.column("label").to_pylist() == [raw.classes[raw.y[i]] for i in idx]
    mu, logvar = Encoder(digits_vae).encode_array(raw.x[idx])
    np.testing.assert_allclose(_emb(t), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_emb(t, "logvar"), logvar, rtol=1e-5, atol=1e-6)


def test_encode_block_keeps_one_encoder_per_process_keyed_by_weights(digits_ae, digits_vae):
    """A CPU task's step reuses its process's encoder across tasks, and a model with other weights (another sha256,
    even under the same path) replaces it rather than being served by the stale one."""
    from raeflow.embed import job

    job._ENCODERS.clear()
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    batch = pa.table({"id": [str(i) for i in range(5)], "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)})
    kw = dict(device="cpu", threads=1, chunk=2)
    a = job.encode_block(batch, model=digits_ae, sha256=model_sha256(digits_ae), **kw)
    first = next(iter(job._ENCODERS.values()))
    job.encode_block(batch, model=digits_ae, sha256=model_sha256(digits_ae), **kw)
    assert next(iter(job._ENCODERS.values())) is first and len(job._ENCODERS) == 1
    np.testing.assert_allclose(_emb(a), Encoder(digits_ae).encode_array(x)[0], rtol=1e-5, atol=1e-6)
    job.encode_block(batch, model=digits_vae, sha256=model_sha256(digits_vae), **kw)
    assert len(job._ENCODERS) == 1 and next(iter(job._ENCODERS.values())) is not first
    job._ENCODERS.clear()


@pytest.mark.ray
def test_embed_streams_blocks_from_parallel_tasks(ray_local, digits_ae, tmp_path, monkeypatch):
    """The CPU pipeline hands the driver many small blocks as tasks finish them (not one block at the end), each
    row exactly once, encoded in more than one worker process when the cluster has two CPUs."""
    import os

    from raeflow.data.sources import Prep, open_source
    from raeflow.embed import job

    n = 2000
    x = np.random.default_rng(1).integers(0, 256, (n, 64), dtype=np.uint8)
    pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64),
                             "label": ["0"] * n}), tmp_path / "x.parquet", row_group_size=250)
    pids = tmp_path / "pids"
    pids.mkdir()
    real = job.encode_block

    def recording(batch, **kw):  # which worker process encoded each block (a file per pid, across processes)
        import time

        (pids / str(os.getpid())).touch()
        time.sleep(0.3)  # long enough that a second free CPU gets the next task rather than the same worker
        return real(batch, **kw)

    monkeypatch.setattr(job, "encode_block", recording)
    monkeypatch.setattr(job, "OUTPUT_BLOCK_BYTES", 8 * 1024)
    free = ray_local.available_resources().get("CPU", 0)
    source = open_source(str(tmp_path / "x.parquet"), Prep("image", (1, 8, 8)))
    done = pa.array([], pa.string())
    tables = list(job._encoded_stream(source, done, Path(digits_ae), model_sha256(digits_ae), 2, 1.0, 0.0, 1, 64,
                                      "cpu"))
    ids = pa.concat_arrays([t.column("id").combine_chunks() for t in tables]).to_pylist()
    assert sorted(ids, key=lambda s: int(s)) == [str(i) for i in range(n)]
    assert len(tables) >= 8  # 8 row groups, each its own task, each cut into ~8 KiB blocks
    if free >= 2:
        assert len(list(pids.iterdir())) >= 2


@pytest.mark.ray
def test_embed_cli_jsonl_summary(ray_local, doc_ae, tmp_path):
    from typer.testing import CliRunner

    from raeflow.cli.main import app

    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"id": f"d{i}", "text": d, "label": "x"}) + "\n" for i, d in enumerate(DOCS))
                  + '{"id": "bad", "text": 3}\n')
    out = tmp_path / "emb"
    r = CliRunner().invoke(app, ["embed", "--model", doc_ae, "--input", str(jl), "--output", str(out), "-w", "1",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    assert "rows in 7 = embedded 6 + errors 1" in r.output
    assert pq.read_table(out / ERRORS_DIR).to_pylist()[0]["id"] == "bad"
    r = CliRunner().invoke(app, ["embed", "--model", doc_ae, "--input", "mnist:test", "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "holds images but the model is a document model" in r.output
