"""``raeflow bench serve``: /denoise throughput and latency, Ray Serve with batching against a plain server.

The plain server is the same FastAPI app (``raeflow.serve.api``) on uvicorn in one process, calling the model
once per request (``DirectBackend``): what one would write without Ray. Both serve the same model, the same
request bodies, on 127.0.0.1.

The load generator is a small asyncio HTTP/1.1 keep-alive client (one connection per concurrent client, bodies
serialised once): on a 2-core machine the client shares the CPU with the servers, so it must cost little per
request. It answers requests/s, p50/p99 latency and failures; a sample of answers is checked (shape, range).

Profiling: CPU seconds of each process (the Serve proxy, the replica, the plain server, this client) over a
run, read from /proc, divided by the requests, say where the time goes; the replica's ``GET /stats`` adds the
model's share and the batch sizes reached.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from raeflow.errors import InputError

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------- load generator
@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    ok: int
    failed: int
    wall_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over the run
    server_stats: dict[str, Any] = field(default_factory=dict)


def _request_bytes(host: str, port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
        return status, body, False
    return status, body, headers.get("connection", "").lower() != "close"


async def _load(host: str, port: int, path: str, bodies: Sequence[bytes], total: int, concurrency: int,
                timeout_s: float, check: Callable[[bytes], str | None], content_type: str = "application/json"
                ) -> tuple[list[float], dict, list[str], float]:
    requests = [_request_bytes(host, port, path, b, content_type) for b in bodies]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    issued = 0
    deadline = time.monotonic() + timeout_s

    async def client(cid: int) -> None:
        nonlocal issued
        conn = None
        checked = False
        while issued < total and time.monotonic() < deadline:
            i = issued
            issued += 1
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, body, keep = await asyncio.wait_for(_read_response(reader), timeout=30)
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200 and len(errors) < 5:
                    errors.append(f"{status}: {body[:200]!r}")
                elif not checked:  # check the first answer of every client
                    checked = True
                    problem = check(body)
                    if problem:
                        statuses["bad_answer"] = statuses.get("bad_answer", 0) + 1
                        if len(errors) < 5:
                            errors.append(problem)
                if not keep:
                    writer.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - a failed request is counted, and the client reconnects
                statuses["error"] = statuses.get("error", 0) + 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return latencies, statuses, errors, time.perf_counter() - t0


def run_load(url: str, path: str, bodies: Sequence[bytes], total: int, concurrency: int, *, label: str = "",
             timeout_s: float = 300, check: Callable[[bytes], str | None] = lambda b: None,
             processes: dict[str, int] | None = None, content_type: str = "application/json") -> LoadResult:
    """``total`` POSTs of ``bodies`` (cycled) to url+path from ``concurrency`` keep-alive clients."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    procs = {"client": os.getpid(), **(processes or {})}
    cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
    try:
        import uvloop

        runner = uvloop.run  # the client's own overhead is part of what the 2 cores must carry: keep it small
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    lat, statuses, errors, wall = runner(_load(host, int(port), path, bodies, total, concurrency, timeout_s,
                                               check, content_type))
    cpu = {k: round(cpu_seconds(p) - cpu0[k], 3) for k, p in procs.items()}
    ok = statuses.get("200", 0) - statuses.get("bad_answer", 0)
    sent = sum(v for k, v in statuses.items() if k != "bad_answer")  # fewer than total if timeout_s cut the run
    a = np.asarray(lat) * 1e3 if lat else np.asarray([np.nan])
    return LoadResult(label, concurrency, sent, ok, sent - ok, round(wall, 3), round(ok / wall, 1),
                      round(float(np.percentile(a, 50)), 2), round(float(np.percentile(a, 99)), 2),
                      round(float(a.mean()), 2), statuses, errors, cpu)


# ------------------------------------------------------------------------------------------------ processes
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0
    return t.user + t.system


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, process title) of every live descendant of ``pid`` (Ray names its actors' processes ``ray::...``)."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            args = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out.append((p.pid, args[0] if args else ""))
    return out


def serve_processes(root: int) -> dict[str, int]:
    """The Serve proxy and replica processes under ``root`` (the server process, which started its Ray)."""
    found: dict[str, int] = {}
    for pid, title in descendants(root):
        if "ProxyActor" in title:
            found["serve_proxy"] = pid
        elif "ServeReplica" in title and "RaeflowIngress" in title:
            found.setdefault("serve_replica", pid)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_plain(models: Sequence[str], port: int, threads: int, log: Log) -> subprocess.Popen:
    """The baseline: ``python -m raeflow.bench.serve PORT THREADS MODEL...`` (uvicorn, one process)."""
    proc = subprocess.Popen([sys.executable, "-m", "raeflow.bench.serve", str(port), str(threads), *models],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    from raeflow.serve.run import terminate, wait_healthy

    try:
        wait_healthy(f"http://127.0.0.1:{port}", 120, alive=lambda: proc.poll() is None)
    except BaseException:
        terminate(proc.pid, 10)
        raise RuntimeError(f"the plain server did not start: {proc.stderr.read().decode()[-2000:]}") from None
    log(f"plain server (uvicorn, 1 process, {threads} torch thread(s)) at http://127.0.0.1:{port}")
    return proc


def _plain_main(argv: list[str]) -> None:
    """The plain server process: uvicorn over ``build_app(DirectBackend)``."""
    import torch
    import uvicorn

    from raeflow.serve.api import DirectBackend, build_app
    from raeflow.serve.service import ModelService

    port, threads, models = int(argv[0]), int(argv[1]), argv[2:]
    torch.set_num_threads(threads)
    services = {s.name: s for s in (ModelService.load(m) for m in models)}
    uvicorn.run(build_app(DirectBackend(services)), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


# ------------------------------------------------------------------------------------------------ workloads
def noisy_images(shape: Sequence[int], n: int, level: float = 0.25, seed: int = 0) -> np.ndarray:
    """``n`` MNIST test digits (or digits, by shape) with masking noise, without the channel axis of a
    one-channel model: what a client sends."""
    clean = clean_images(shape, n)
    rng = np.random.default_rng(seed)
    noisy = np.where(rng.random(clean.shape) < level, 0.0, clean)
    return noisy[:, 0] if shape[0] == 1 else noisy


def denoise_bodies(shape: Sequence[int], n: int = 64, level: float = 0.25, seed: int = 0) -> list[bytes]:
    """``n`` one-image /denoise bodies: MNIST test digits (or digits, by shape) with masking noise."""
    return [json.dumps({"images": [np.round(img, 3).tolist()]}, separators=(",", ":")).encode()
            for img in noisy_images(shape, n, level, seed)]


def npy_bodies(shape: Sequence[int], batch: int, n: int = 16, level: float = 0.25, seed: int = 0) -> list[bytes]:
    """``n`` binary /denoise bodies, each one ``.npy`` of ``batch`` noisy test digits, float32 (batch, H, W)."""
    import io

    sq = noisy_images(shape, n * batch, level, seed).astype(np.float32)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        np.save(buf, sq[i * batch:(i + 1) * batch])
        out.append(buf.getvalue())
    return out


def npy_answer_check(shape: Sequence[int], batch: int) -> Callable[[bytes], str | None]:
    import io

    def check(body: bytes) -> str | None:
        try:
            imgs = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            return f"unparseable .npy answer: {e}"
        if imgs.shape != (batch, *shape):
            return f"answer of shape {imgs.shape}, expected {(batch, *shape)}"
        if not (np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1):
            return "answer values outside [0, 1]"
        return None

    return check


def clean_images(shape: Sequence[int], n: int) -> np.ndarray:
    from raeflow.data import load_eval_data

    name = {(1, 28, 28): "mnist", (1, 8, 8): "digits"}.get(tuple(shape))
    if name is None:
        raise InputError(f"bench serve has test images for 1x28x28 (mnist) and 1x8x8 (digits) models, not {shape}")
    x = load_eval_data(name).x
    return np.concatenate([x] * -(-n // len(x)))[:n].astype(np.float64)  # cycled when n exceeds the test set


def answer_check(shape: Sequence[int]) -> Callable[[bytes], str | None]:
    want = tuple(shape[1:]) if shape[0] == 1 else tuple(shape)

    def check(body: bytes) -> str | None:
        try:
            imgs = np.asarray(json.loads(body)["images"], dtype=np.float64)
        except Exception as e:  # noqa: BLE001
            return f"unparseable answer: {e}"
        if imgs.shape != (1, *want):
            return f"answer of shape {imgs.shape}, expected {(1, *want)}"
        if not (np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1):
            return "answer values outside [0, 1]"
        return None

    return check


DEFAULT_MODELS = {
    # A dense DAE of Vincent et al.'s shape, smaller, and a conv DAE (Masci et al.'s CAE with masking noise).
    "dae-dense": ["--variant", "dae", "--dataset", "mnist", "-k", "32", "--set", "model.hidden=[500,250]",
                  "--epochs", "5"],
    "dae-conv": ["--variant", "cae", "--dataset", "mnist", "--set", "model.channels=[32,64]",
                 "--set", "model.corruption={kind: masking, level: 0.25}", "--epochs", "1", "-b", "256"],
}


def ensure_models(workdir: Path, log: Log) -> list[str]:
    """Train the two default models into ``workdir`` (once; later runs reuse them)."""
    out = []
    for name, args in DEFAULT_MODELS.items():
        d = workdir / name
        if not (d / "model" / "config.json").is_file():
            log(f"training {name} (once) into {d}")
            subprocess.run([sys.executable, "-m", "raeflow.cli.main", "train", "--local", *args, "-o", str(d)],
                           check=True, stdout=subprocess.DEVNULL)
        out.append(str(d))
    return out


# ---------------------------------------------------------------------------------------------------- bench
def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    import ray
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}; load average at "
            f"start {os.getloadavg()[0]:.2f}")


def _get_stats(url: str) -> dict[str, Any]:
    import httpx

    try:
        return httpx.get(f"{url}/stats", timeout=10).json()
    except Exception:  # noqa: BLE001 - stats are informative only
        return {}


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a server's /stats counters grew by over a run, and the mean batch it reached."""
    keys = ("requests", "batches", "items", "model_s")
    if not all(k in before and k in after for k in keys):
        return {}
    d = {k: after[k] - before[k] for k in keys}
    d["model_s"] = round(d["model_s"], 4)
    d["mean_batch"] = round(d["requests"] / d["batches"], 2) if d["batches"] else None
    return d


MODES = ("plain", "serve", "direct")


def start_serve(models: Sequence[str], mode: str, options: dict[str, Any], workdir: Path, log: Log
                ) -> tuple[subprocess.Popen, str]:
    """Ray Serve in a child process with its own local Ray (``raeflow.serve.run``): through Serve's proxy
    (``serve``) or with direct ingress (``direct``)."""
    from raeflow.serve.run import ServerSpec, spawn, terminate, wait_healthy

    spec = ServerSpec(models=list(models), port=free_port(), options=options, direct_ingress=mode == "direct")
    log_path = workdir / f"serve-{mode}.log"
    proc = spawn(spec, workdir / f"serve-{mode}.spec.json", log_path)
    try:
        wait_healthy(spec.url, 240, alive=lambda: proc.poll() is None)
    except BaseException as e:
        terminate(proc.pid, 30)
        raise RuntimeError(f"Serve ({mode}) did not start: {e}\n{log_path.read_text()[-2000:]}") from None
    log(f"Ray Serve ({'direct ingress' if mode == 'direct' else 'through the proxy'}) at {spec.url}")
    return proc, spec.url


def bench_serve(models: Sequence[str], *, requests: int = 5000, concurrencies: Sequence[int] = (1, 8, 32),
                modes: Sequence[str] = MODES, warmup: int = 200, threads: int = 1, max_batch_size: int = 32,
                batch_wait_ms: float = 5.0, max_ongoing_requests: int = 64, timeout_s: float = 300,
                body: str = "json", batch: int = 1, workdir: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Load each model's /denoise on the plain server and on Ray Serve (each mode); return every figure.

    ``body="json"``: one image per request as JSON (``batch`` must be 1); ``body="npy"``: ``batch`` images per
    request as one ``.npy`` body, answered as ``.npy``. The plain server runs first and, when other servers
    were loaded, again last: a ratio is taken against both plain runs of the same bench, never against a
    figure from another run."""
    import tempfile

    from raeflow.serve.codec import NPY
    from raeflow.serve.run import terminate
    from raeflow.serve.service import ModelService

    unknown = set(modes) - set(MODES)
    if unknown:
        raise InputError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if body not in ("json", "npy") or batch < 1 or (body == "json" and batch != 1):
        raise InputError("--body json sends one image per request (--batch 1); --body npy sends --batch images")
    options = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_ms / 1000,
               "max_ongoing_requests": max_ongoing_requests, "threads": threads}
    report: dict[str, Any] = {"machine": machine(), "requests": requests, "concurrency": list(concurrencies),
                              "modes": list(modes), "options": {**options, "torch_threads": threads},
                              "body": body, "images_per_request": batch, "models": {}}
    content_type = NPY if body == "npy" else "application/json"
    loads = {}
    for m in models:
        svc = ModelService.load(m)
        svc.require("denoise")
        if body == "npy":
            work = (npy_bodies(svc.input_shape, batch), npy_answer_check(svc.input_shape, batch))
        else:
            work = (denoise_bodies(svc.input_shape), answer_check(svc.input_shape))
        loads[svc.name] = (*work, svc.describe())

    def run_all(label: str, url: str, procs: Callable[[], dict[str, int]]) -> None:
        for name, (bodies, check, desc) in loads.items():
            path = f"/{name}/denoise"
            run_load(url, path, bodies, warmup, 8, label="warmup", check=check,  # allocate, warm caches
                     content_type=content_type)
            for c in concurrencies:
                before = _get_stats(url)
                r = run_load(url, path, bodies, requests, c, label=label, timeout_s=timeout_s, check=check,
                             processes=procs(), content_type=content_type)
                r.server_stats = stats_delta(before, _get_stats(url))
                entry = report["models"].setdefault(name, {"model": desc, "runs": []})
                entry["runs"].append(asdict(r))
                log(f"{label:<6} {name:<12} c={c:<3} {r.rps:8.1f} req/s ({r.rps * batch:8.0f} images/s)  p50 "
                    f"{r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  failed {r.failed}  cpu {r.cpu_s}")

    # The plain server first and last: the yardstick measured on both sides of the others, in this run.
    order = list(modes) + (["plain"] if "plain" in modes and len(set(modes)) > 1 else [])
    report["load_average"] = {}
    with tempfile.TemporaryDirectory(prefix="raeflow-bench-serve-", dir=workdir) as tmp:
        for mode in order:  # one server at a time, so none shares the CPU with another's idle processes
            report["load_average"].setdefault(mode, []).append(round(os.getloadavg()[0], 2))
            if mode == "plain":
                port = free_port()
                proc = start_plain(models, port, threads, log)
                url = f"http://127.0.0.1:{port}"
                procs: Callable[[], dict[str, int]] = lambda: {"plain_server": proc.pid}  # noqa: E731
            else:
                proc, url = start_serve(models, mode, options, Path(tmp), log)
                procs = lambda: serve_processes(proc.pid)  # noqa: E731
            try:
                run_all(mode, url, procs)
            finally:
                terminate(proc.pid, 60)
    report["summary"] = summarise(report)
    return report


def summarise(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, concurrency, mode) with the ratio to the plain server (the mean of its runs in this
    report: first and last) and the CPU per request. No plain run at that concurrency: no ratio (None)."""
    rows = []
    per = int(report.get("images_per_request", 1))
    for name, m in report["models"].items():
        for c in report["concurrency"]:
            plain = [r["rps"] for r in m["runs"] if r["label"] == "plain" and r["concurrency"] == c]
            base = sum(plain) / len(plain) if plain and all(plain) else None
            for mode in dict.fromkeys(report["modes"]):
                for i, r in enumerate(x for x in m["runs"] if x["label"] == mode and x["concurrency"] == c):
                    st = r.get("server_stats") or {}
                    done = max(1, r["ok"])
                    rows.append({"model": name, "concurrency": c, "mode": mode if i == 0 else f"{mode} (last)",
                                 "rps": r["rps"], "images_per_s": round(r["rps"] * per, 1),
                                 "vs_plain": round(r["rps"] / base, 2) if base else None,
                                 "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "failed": r["failed"],
                                 "mean_batch": st.get("mean_batch"),
                                 "model_ms_per_request": (round(1e3 * st["model_s"] / max(1, st["requests"]), 3)
                                                          if st.get("requests") else None),
                                 "cpu_ms_per_request": {k: round(1e3 * v / done, 2) for k, v in r["cpu_s"].items()}})
    return rows


MODE_NAMES = {"plain": "plain uvicorn", "serve": "Serve (proxy)", "direct": "Serve (direct ingress)"}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | clients | server | req/s | images/s | vs plain | p50 ms | p99 ms | mean batch | model ms/req "
             "| CPU ms/req (process) | failed |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in report["summary"]:
        cpu = ", ".join(f"{k.replace('serve_', '')} {v:g}" for k, v in r["cpu_ms_per_request"].items())
        # No plain run in this report at this concurrency: no ratio is printed (never one against another run).
        ratio = f"{r['vs_plain']:.2f}x" if r["vs_plain"] is not None else "no plain side"
        mode, last = r["mode"].removesuffix(" (last)"), r["mode"].endswith(" (last)")
        lines.append(f"| {r['model']} | {r['concurrency']} | {MODE_NAMES[mode]}{' (last)' if last else ''} | "
                     f"{r['rps']:.0f} | {r['images_per_s']:.0f} | {ratio} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch'] or '-'} | "
                     f"{r['model_ms_per_request'] if r['model_ms_per_request'] is not None else '-'} | {cpu} | "
                     f"{r['failed']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _plain_main(sys.argv[1:])
