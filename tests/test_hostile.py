"""Hostile and careless inputs: every case ends with its expected exit code and message (or HTTP status, or error
row), within a time bound, without allocating what the input asks for; and no socket of raeflow's process tree
listens beyond 127.0.0.1.

The CLI cases run in-process through Typer's runner (a subprocess costs seconds of imports each): the exit code
and the single ``error:`` line are what a user sees. Cases that could hang (FIFOs, /dev/zero) run under
``pytest.mark.timeout``; cases that could allocate gigabytes run in a subprocess under ``RLIMIT_AS``, so a
regression fails the test instead of the machine. The README's "Reliability" table lists these cases.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from raeflow.cli.main import app
from raeflow.errors import ConfigError, InputError, ModelFileError, UserError

pytestmark = pytest.mark.timeout(60)


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    out = r.output  # stdout and stderr, as a terminal shows them
    if r.exit_code == 1 and r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a bug: show its traceback in the test report
    return r.exit_code, out


def one_error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out
    assert "Traceback" not in out, out
    return lines[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A small VAE (a generator: /generate takes codes) trained in-process on digits; the model-file probes
    damage copies of it."""
    from raeflow.cli.common import build_run_config
    from raeflow.train.run import train

    out = tmp_path_factory.mktemp("hostile") / "vae"
    cfg = build_run_config(None, ["model.hidden=[32]"], variant="vae", dataset="digits", epochs=1, latent_dim=4,
                           batch_size=64, output=str(out), seed=0, workers=None, gpu=False, lr=None,
                           storage_path=None, address=None)
    train(cfg, local=True, log=lambda *_: None)
    return out


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "model", dst / "model")
    return dst


# --------------------------------------------------------------------------------------------- config values
TRAIN = ("train", "--local", "-d", "digits")  # every case is refused before the data is even loaded


@pytest.mark.parametrize("args, key", [
    (["--set", "train.grad_clip=-1"], "train.grad_clip=-1"),       # was: gradient ascent, exit 0
    (["--batch-size", "0"], "train.batch_size=0"),                 # was: crash (--local) / silently 1 (Ray)
    (["--set", "train.epochs=1.5"], "train.epochs=1.5"),           # was: ran 2 epochs
    (["--latent-dim", "0"], "model.latent_dim=0"),                 # was: trained, saved, crashed in the plots
    (["--latent-dim", "-3"], "model.latent_dim=-3"),
    (["--set", "train.checkpoint_every=0"], "train.checkpoint_every=0"),
    (["--set", "train.threads=-1"], "train.threads=-1"),
    (["--set", "train.lr=.nan"], "train.lr=nan"),
    (["--set", "train.optimizer=adamm"], "one of adam, adamw, sgd"),
    (["--set", "ray.workers=true"], "ray.workers=True"),          # a bool is not a count
    (["--set", "model.hidden=[300000,300000]"], "model.hidden[0]=300000"),
    (["--set", "model.hidden=[60000,60000]"], "parameters"),       # in range per layer, refused by count
])
def test_bad_config_values_are_one_line_exit_2(args, key, tmp_path):
    code, out = run_cli(*TRAIN, "-o", str(tmp_path / "run"), *args)
    assert code == 2, out
    assert key in one_error_line(out)
    assert not (tmp_path / "run").exists()  # refused before any directory is made


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    code, out = run_cli(*TRAIN, "-o", str(f))
    assert code == 2 and "is a file" in one_error_line(out)


@pytest.mark.timeout(20)
def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                    for p, c in zip("abcdefgh", "bcdefghi")]
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(bomb) + "\nvariant: ae\n")
    code, out = run_cli(*TRAIN, "-c", str(f), "-o", str(tmp_path / "run"))
    assert code == 2 and "aliases" in one_error_line(out)


def test_yaml_syntax_error_and_non_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: {epochs: 3\n")
    code, out = run_cli(*TRAIN, "-c", str(f))
    assert code == 2 and "not valid YAML" in one_error_line(out)
    f.write_text("- just\n- a list\n")
    code, out = run_cli(*TRAIN, "-c", str(f))
    assert code == 2 and "YAML mapping" in one_error_line(out)


# ------------------------------------------------------------------------------------------- data on disk
@pytest.mark.timeout(20)
def test_fifo_and_device_named_like_data_do_not_hang_train(tmp_path):
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    code, out = run_cli(*TRAIN, "-d", str(fifo), "-o", str(tmp_path / "r1"))
    assert code == 2 and "FIFO, not a regular file" in one_error_line(out)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    code, out = run_cli(*TRAIN, "-d", str(zero), "-o", str(tmp_path / "r2"))
    assert code == 2 and "device, not a regular file" in one_error_line(out)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    code, out = run_cli(*TRAIN, "-d", str(folder), "-o", str(tmp_path / "r3"))
    assert code == 2 and "b.png: a FIFO" in one_error_line(out)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """A real 10000x10000 grey PNG: ~100 KB on disk, 100 MB decoded (300 MB as RGB, 1.2 GB as RGB float32)."""
    p = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (10000, 10000)).save(p, compress_level=1)
    return p


def _in_subprocess(code: str, limit_gib: float, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is capped: a regression that allocates what a
    hostile input asks for dies there (MemoryError) instead of taking the machine."""
    pre = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * 2**30)}, "
           f"{int(limit_gib * 2**30)}))\n")
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})  # noqa: S603


@pytest.mark.timeout(180)  # two fixtures (a trained model, a 100 MB image) and a fresh interpreter importing torch
def test_huge_inputs_are_refused_before_allocation(huge_png, digits_run, tmp_path):
    """Under a 3 GiB address space (torch's import alone maps ~1.5 GiB), in one interpreter for both probes:
    a huge first image in a folder (the old path resized every image to it: 15 GiB for 150 images) and a model
    whose config.json asks for 3.6e9 parameters (the old path allocated them before looking at the weights)."""
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(huge_png, folder / "0-huge.png")  # sorted first
    for i in range(3):
        Image.new("L", (16, 16), 200).save(folder / f"{i + 1}.png")
    d = copy_model(digits_run, tmp_path / "m")
    cfg = json.loads((d / "model" / "config.json").read_text())
    cfg["model"]["hidden"] = [60000, 60000]
    (d / "model" / "config.json").write_text(json.dumps(cfg))
    p = _in_subprocess(f"""
        from raeflow.artifact import TrainedModel
        from raeflow.data.user import load_user_data
        from raeflow.errors import InputError, ModelFileError
        try:
            load_user_data({str(folder)!r})
        except InputError as e:
            print("IMAGE REFUSED", e)
        try:
            TrainedModel.load({str(d)!r}).model
        except ModelFileError as e:
            print("MODEL REFUSED", e)
        """, 3)
    assert "IMAGE REFUSED" in p.stdout and "pixels" in p.stdout and "0-huge.png" in p.stdout, p.stderr[-2000:]
    assert "MODEL REFUSED" in p.stdout and "parameters" in p.stdout, p.stderr[-2000:]


def test_large_first_image_is_bounded_default_size(tmp_path):
    from raeflow.data.decode import MAX_DEFAULT_PIXELS
    from raeflow.data.user import load_user_data

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (2000, 1000)).save(folder / "0.png")
    Image.new("L", (16, 16)).save(folder / "1.png")
    kind, raw = load_user_data(folder)
    h, w = raw.x.shape[2:]
    assert h * w <= MAX_DEFAULT_PIXELS and abs(w / h - 2.0) < 0.05  # aspect kept, bounded


def _word(i: int) -> str:
    """A distinct stem-proof word per integer (letters only: the tokeniser drops digits)."""
    out = ""
    for _ in range(3):
        i, r = divmod(i, 26)
        out += "bcdfghjklmnpqrstvwxyzbcdfg"[r] + "aeiou"[r % 5]
    return out


def test_documents_are_held_sparse_and_only_their_sparse_size_is_bounded(tmp_path, monkeypatch):
    """10,000 documents over a 2,000-stem vocabulary: 80 MB as dense float32 rows, ~0.5 MB as CSR. Under a 4 MiB
    data budget they train (rows densified per batch) -- the dense matrix would have been refused -- and under
    a 0.1 MiB budget the sparse rows themselves are refused, naming the budget."""
    f = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    f.write_text("".join(json.dumps({"text": " ".join(_word(int(w)) for w in rng.integers(0, 3000, 6))}) + "\n"
                         for _ in range(10_000)))
    monkeypatch.setenv("RAEFLOW_MAX_DATA_BYTES", str(4 << 20))
    from raeflow.data import load_training_data

    data = load_training_data(str(f))
    assert data.train.x.shape[1] == 2000 and len(data.train) + len(data.val) == 10_000  # ~9,000 train rows
    assert data.train.x.nbytes < 1 << 20  # dense: 72 MB
    code, out = run_cli("train", "--local", "-d", str(f), "-e", "1", "-b", "256", "-k", "2",
                        "--set", "model.hidden=[8]", "-o", str(tmp_path / "r"))
    assert code == 0, out
    monkeypatch.setenv("RAEFLOW_MAX_DATA_BYTES", str(100 << 10))
    code, out = run_cli("train", "--local", "-d", str(f), "-e", "1", "-o", str(tmp_path / "r2"))
    assert code == 2 and "budget" in one_error_line(out) and "sparse" in one_error_line(out)


def test_small_image_folder_trains_end_to_end(tmp_path):
    """Under 10 images (the plots used to always draw 10 validation images): trains, plots, summary, exit 0."""
    folder = tmp_path / "tiny"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), np.uint8)).save(folder / c / f"{i}.png")
    code, out = run_cli("train", "--local", "-d", str(folder), "-e", "2", "-b", "2", "-k", "2",
                        "--set", "model.hidden=[8]", "-o", str(tmp_path / "run"))
    assert code == 0, out
    assert "selected epoch" in out or "kept the last epoch" in out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert any((tmp_path / "run" / "plots").iterdir())


def test_failed_start_does_not_block_rerun(tmp_path):
    from raeflow.config import RunConfig
    from raeflow.train.rundir import RunDir

    cfg = RunConfig(output=str(tmp_path / "run"))
    RunDir.create(cfg)  # what a run that dies before training leaves
    RunDir.create(cfg)  # the same command again: allowed
    (tmp_path / "run" / "checkpoints").mkdir()  # a run that trained a while: kept, and --resume is suggested
    with pytest.raises(UserError, match="--resume"):
        RunDir.create(cfg)


# ------------------------------------------------------------------------------------------- model files
@pytest.mark.timeout(20)
def test_weights_linked_to_dev_zero_do_not_hang(digits_run, tmp_path):
    from raeflow.artifact import TrainedModel

    d = copy_model(digits_run, tmp_path / "m")
    w = d / "model" / "model.safetensors"
    w.unlink()
    w.symlink_to("/dev/zero")
    art = TrainedModel.load(d)
    with pytest.raises(InputError, match="device, not a regular file"):
        art.sha256
    with pytest.raises(InputError, match="device, not a regular file"):
        art.model
    code, out = run_cli("search", "-e", str(tmp_path), "-m", str(d), "-q", "digits:test:0")
    assert code == 2, out


def test_corrupt_weights_fail_serve_before_ray(digits_run, tmp_path):
    d = copy_model(digits_run, tmp_path / "m")
    (d / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, out = run_cli("serve", "-m", str(d), "--port", "1")
    assert code == 2 and "safetensors" in one_error_line(out)


# ----------------------------------------------------------------------------------------- embed: no loss
def test_duplicate_ids_become_error_rows_and_resume_keeps_every_row(tmp_path):
    from raeflow.data.readers import read_jsonl

    f = tmp_path / "dup.jsonl"
    f.write_text("".join(json.dumps({"id": "a", "text": f"document {i}"}) + "\n" for i in range(5)))
    batch = pa.table({"path": [str(f)]})
    rows = pa.concat_tables(list(read_jsonl(batch, text_field="text", id_field="id", label_field=None, done=None)))
    assert rows.num_rows == 5  # rows in = embedded (1) + errors (4)
    errs = [e for e in rows.column("error").to_pylist() if e]
    assert len(errs) == 4 and all("duplicate id 'a'" in e for e in errs)
    assert len(set(rows.column("id").to_pylist())) == 5  # every row its own id: committed once each
    assert rows.column("source").to_pylist() == ["0", "1", "2", "3", "4"]  # positions: what resume skips by
    # A resume that had committed the first row and one duplicate re-reads exactly the other three.
    done = pa.array(rows.column("source").to_pylist()[:2])
    again = pa.concat_tables(list(read_jsonl(batch, text_field="text", id_field="id", label_field=None, done=done)))
    assert again.column("id").to_pylist() == rows.column("id").to_pylist()[2:]


def test_duplicate_ids_across_files_are_error_rows_and_resume_loses_none(tmp_path):
    """Two Parquet files both holding id 'y': whichever reaches the writer second is an error row naming it. A
    crash after the first file was committed, then --resume: the second file's 'y' is re-read (resume skips by
    source, not id) and reported -- rows in = embedded + errors over both runs, nothing dropped."""
    from raeflow.embed.output import PartWriter, committed, error_files
    from raeflow.data.readers import Prep, read_parquet_units

    for name, ids in (("a", ["x", "y"]), ("b", ["y", "z"])):
        pq.write_table(pa.table({"id": ids, "text": [f"doc {i}" for i in ids]}), tmp_path / f"{name}.parquet")
    files = [(str(tmp_path / "a.parquet"), "a.parquet#"), (str(tmp_path / "b.parquet"), "b.parquet#")]

    def read(file: int, done):
        units = pa.table({"file": [file], "row_group": [0], "first_row": [0]})
        blocks = list(read_parquet_units(
            units, files=files, column="text", id_column="id", label_column=None, prep=Prep("text", (4,)),
            kind="text", x_dtype="float32", done=done))
        return pa.concat_tables(blocks) if blocks else pa.table({"id": pa.array([], pa.string())})

    schema = pa.schema([("id", pa.string()), ("label", pa.string()), ("source", pa.string())])
    err_schema = pa.schema([("id", pa.string()), ("error", pa.string()), ("source", pa.string())])

    def writer(first_part=0):
        return PartWriter(tmp_path / "out", schema, err_schema, 1, first_part)

    w = writer()
    assert w.add(read(0, None).drop_columns(["text"])) == (2, 0)  # file a committed, then the job dies
    taken, done = committed(tmp_path / "out")
    assert sorted(done.to_pylist()) == ["a.parquet#0", "a.parquet#1"]
    w2 = writer(first_part=w.next_part)
    w2.already(taken)
    assert read(0, done).num_rows == 0  # file a: nothing left to read
    again = read(1, done)
    assert again.column("id").to_pylist() == ["y", "z"]  # b's 'y' is read, although 'y' is committed
    assert w2.add(again.drop_columns(["text"])) == (1, 1)
    w2.close()
    errs = pq.read_table(error_files(tmp_path / "out")[0]).to_pylist()
    assert errs == [{"id": "y#duplicate@b.parquet#0", "source": "b.parquet#0",
                     "error": "b.parquet#0: duplicate id 'y' (an earlier row has it); ids must be unique"}]
    emb = pq.read_table(tmp_path / "out").column("id").to_pylist()
    assert sorted(emb) == ["x", "y", "z"]  # 4 rows in = 3 embedded + 1 error


def test_undecodable_name_fifo_and_huge_image_are_error_rows(tmp_path, huge_png):
    from raeflow.data.readers import Prep, _list_files, decode_image_files

    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("L", (8, 8), 128).save(root / "good.png")
    Image.new("L", (8, 8)).save(os.fsencode(root) + b"/bad\xff.png")
    os.mkfifo(root / "pipe.png")
    (root / "huge.png").write_bytes(huge_png.read_bytes())
    (root / "zero.png").symlink_to("/dev/zero")
    files = _list_files(root)
    assert len(files) == 5
    out = decode_image_files(pa.table({"path": files}), root=str(root), prep=Prep("image", (1, 8, 8)),
                             labelled=False)
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist()))
    assert errors["good.png"] is None
    bad = next(k for k in errors if "not UTF-8" in k)
    assert "b'bad\\xff.png'" in errors[bad] and "rename" in errors[bad]
    assert "FIFO" in errors["pipe.png"] and "device" in errors["zero.png"] and "pixels" in errors["huge.png"]


# ------------------------------------------------------------------------------------- error taxonomy, JSON
def test_taxonomy_user_errors_are_one_line_bugs_keep_traceback():
    import typer

    from raeflow.cli.errors import fail

    for user in (ConfigError("k=1: bad"), ModelFileError("m: bad"), FileNotFoundError(2, "No such file", "x.yaml"),
                 yaml.YAMLError("bad")):
        with pytest.raises(typer.Exit) as e:
            fail(user)
        assert e.value.exit_code == 2
    bug = ValueError("operands could not be broadcast together")  # from numpy's insides: a bug
    with pytest.raises(ValueError) as e:
        fail(bug)
    assert e.value is bug


def test_strict_json_has_no_nan():
    from raeflow import strict_json

    text = strict_json.dumps({"score": math.nan, "rows": [1.0, math.inf, np.float32("nan")]})
    assert json.loads(text) == {"score": None, "rows": [1.0, None, None]}
    assert "NaN" not in text and "Infinity" not in text


@pytest.fixture(scope="module")
def client(digits_run):
    from fastapi.testclient import TestClient

    from raeflow.serve.api import DirectBackend, build_app
    from raeflow.serve.service import ModelService

    svc = ModelService.load(digits_run, name="ae")
    return TestClient(build_app(DirectBackend({"ae": svc})))


def test_http_head_booleans_and_huge_codes(client):
    assert client.head("/healthz").status_code == 200
    assert client.head("/models").status_code == 200
    img = [[0.5] * 8 for _ in range(8)]
    assert client.post("/ae/reconstruct", json={"images": [img]}).status_code == 200
    img[3][3] = True
    r = client.post("/ae/reconstruct", json={"images": [img]})
    assert r.status_code == 422 and "true/false" in r.json()["error"]
    r = client.post("/ae/generate", json={"z": [[1e30] * 4]})
    assert r.status_code == 422 and "within" in r.json()["error"] and "NaN" not in r.text


@pytest.mark.timeout(20)
def test_stalled_request_body_gets_408():
    import asyncio

    from raeflow.serve.api import BodyLimit

    async def app(scope, receive, send):  # reads the body like a route would
        while (await receive()).get("more_body"):
            pass

    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)  # the client stalls

    messages = []

    async def send(msg):
        messages.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/ae/encode", "headers": []}
    asyncio.run(BodyLimit(app, read_timeout_s=0.3)(scope, receive, send))
    assert messages[0]["status"] == 408


# ------------------------------------------------------------------------------------ sockets (with Ray)
def _non_loopback_listeners() -> list[str]:
    """Listening TCP sockets of this process and every descendant (Ray's GCS, raylet, workers, Serve's proxy
    and replicas, Train's workers) whose address is not loopback."""
    import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path
    import psutil

    me = psutil.Process()
    bad = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
            name = " ".join(p.cmdline()[:3])[:120]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
                bad.append(f"{c.laddr.ip}:{c.laddr.port} pid {p.pid} {name}")
    return bad


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_no_socket_beyond_loopback_during_serve_and_2_worker_train(serve_url, tmp_path):
    import threading

    import httpx

    from raeflow.cli.common import build_run_config
    from raeflow.train.run import train

    assert httpx.get(f"{serve_url}/healthz").status_code == 200
    assert _non_loopback_listeners() == []  # Ray + Serve (proxy, controller, replicas) all on 127.0.0.1
    seen: list[str] = []
    stop = threading.Event()

    def watch():  # torch.distributed's rendezvous store lives only while the workers run: sample throughout
        while not stop.is_set():
            seen.extend(_non_loopback_listeners())
            stop.wait(0.3)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    cfg = build_run_config(None, ["model.hidden=[16]", "ray.max_failures=0"], variant="ae", dataset="digits",
                           epochs=2, latent_dim=2, batch_size=64, output=str(tmp_path / "run"), seed=0, workers=2,
                           gpu=False, lr=None, storage_path=None, address=None)
    try:
        train(cfg, log=lambda *_: None)
    finally:
        stop.set()
        t.join()
    assert sorted(set(seen)) == []
