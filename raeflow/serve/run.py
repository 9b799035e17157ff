"""Starting and stopping the server: in this process (``start`` / ``serve_forever``), detached in the background
(``detach``), and stopping a detached one (``stop``).

A detached server is this module run as a child process (``python -m raeflow.serve.run SPEC.json``) in its own
session, so it outlives the shell that started it and owns its Ray instance; its pid, URL and log path go to a
state file named after the port, which ``raeflow serve --stop`` reads. Stopping sends SIGTERM, which the child
turns into the same clean shutdown as Ctrl-C (Serve, then the Ray instance it started).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from raeflow.serve.options import AppConfig, IndexSpec, ModelSpec, ServeOptions
from raeflow.serve.service import run_name
from raeflow.errors import InputError, MissingFileError, RunExistsError, ServerError

DEFAULT_PORT = 8000


@dataclass
class ServerSpec:
    """Everything ``raeflow serve`` was asked for; JSON-serialisable so a detached child can be given it."""

    models: list[str]  # run (or model) directories
    indexes: dict[str, str] = field(default_factory=dict)  # NAME -> embeddings directory
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    address: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # ServeOptions fields
    #: Serve's per-request access log lines (proxy and replica). Off by default: on a small machine they cost
    #: CPU on every request; errors are logged either way.
    access_log: bool = False
    #: Ray Serve 2.60's direct ingress: the ingress replica itself answers HTTP on ``port`` (replica i on
    #: port + i), skipping the proxy hop; see direct_ingress_env. None: chosen by :func:`use_direct_ingress`
    #: (direct on a Ray instance started here, the proxy on a joined cluster).
    direct_ingress: bool | None = None

    def app_config(self) -> AppConfig:
        if not self.models:
            raise InputError("give at least one --model RUN_DIR")
        from raeflow.io import model_dir

        from raeflow.artifact import TrainedModel

        specs, seen = [], {}
        for path in self.models:
            model_dir(path)  # fails here, with a clear message, on a path that holds no model
            # Load it here, once, before Ray starts: a model that cannot load (corrupt weights, an implausible
            # config) is this one clear error, not Serve's "Failed to update the deployments" with the cause
            # only in a replica's log.
            TrainedModel.load(path).model
            name = run_name(path)
            if name in seen:
                raise InputError(f"two models would both be served as {name!r} ({seen[name]} and {path}): a model's "
                                 "name is its run directory's name, so rename or copy one")
            seen[name] = path
            specs.append(ModelSpec(name, str(Path(path).resolve())))
        for name, path in self.indexes.items():
            if not Path(path).is_dir():
                raise MissingFileError(f"--index {name}={path}: no such directory")
        return AppConfig(specs, [IndexSpec(n, str(Path(p).resolve())) for n, p in self.indexes.items()],
                         ServeOptions(**self.options))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def use_direct_ingress(spec: ServerSpec) -> bool:
    """Whether the replicas answer HTTP themselves: as asked, else yes when this command starts its own Ray.

    Direct ingress is the default because it is the fast path (BENCHMARKS.md, "Serving": 1.15-1.16x the plain server
    at 32 clients, against 0.21-0.26x through the proxy). Its flags are read when Ray starts, so a
    joined cluster (``--address``, ``RAY_ADDRESS``, or Ray already initialised in this process) keeps Serve's
    proxy -- which is also the right choice there: one port in front of replicas spread over several nodes,
    routed by load.
    """
    from raeflow.raycluster import apply_env

    apply_env()  # before Ray's first import, as start() does: some of Ray's settings are read only then
    import ray

    joined = bool(spec.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    if spec.direct_ingress and joined:
        raise InputError("--direct-ingress sets Ray Serve flags that are read when Ray starts: it needs the "
                         "local Ray instance `raeflow serve` starts itself (no --address, no RAY_ADDRESS); "
                         "on a cluster, Serve's proxy (--proxy) routes to the replicas")
    return (not joined) if spec.direct_ingress is None else spec.direct_ingress


def direct_ingress_env(port: int, replicas: int) -> dict[str, str]:
    """Environment for a local Ray instance whose Serve replicas take HTTP directly (no proxy hop).

    Measured here (BENCHMARKS.md, "Serving"): through the proxy a request costs several ms of CPU across the
    proxy and replica processes, because the proxy path is two Ray actor calls per request (the request, then
    the replica fetching the body back from the proxy). Serve allocates direct-ingress ports from a range: the
    range is set to exactly the ports we promise. Serve's own proxy still starts (on another, free port); the
    replicas' drain period drops from 30 s to 1 s so Ctrl-C is quick. ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` is
    Serve's documented high-throughput mode; what it changed here is that the replica runs our code on its own
    event loop (not on a second loop in another thread): requests reach ``@serve.batch`` without a hop between
    threads, and at 32 clients batches filled (31.8 requests on average, against 3.8 without it: 1.38x the plain
    server instead of 0.81x). These are Serve's environment flags, read when Ray starts: so only for a Ray
    started here.
    """
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + replicas),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A server this process started: ``url`` and ``stop()``."""

    url: str
    started_ray: bool

    def stop(self) -> None:
        from ray import serve

        from raeflow.raycluster import shutdown_if_started
        from raeflow.serve.app import APP_NAME

        if self.started_ray:
            serve.shutdown()  # our own Ray instance: take Serve (controller, proxy) down with it
            shutdown_if_started(owner="serve")
        else:
            serve.delete(APP_NAME)  # a shared cluster: remove our application only


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise ServerError(f"the server exited before it was healthy ({last})")
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"/healthz answered {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise ServerError(f"{url}/healthz not healthy after {timeout_s:.0f} s ({last})")


def start(spec: ServerSpec, log: Callable[[str], None] = print, timeout_s: float = 180) -> RunningServer:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port, deploy the ingress; return once healthy."""
    config = spec.app_config()  # validate (and load every model) before importing or starting anything of Ray's
    from raeflow.raycluster import apply_env

    apply_env()  # library callers too: before Ray's first import, whatever imported raeflow.serve.run
    from ray import serve

    from raeflow.raycluster import ensure_ray
    from raeflow.serve.app import APP_NAME, build
    proxy_port = spec.port
    direct = use_direct_ingress(spec)
    if direct:
        o = config.options
        os.environ.update(direct_ingress_env(spec.port, o.max_replicas if o.replicas == "auto" else int(o.replicas)))
        proxy_port = _free_port(spec.host)  # Serve's proxy still starts: out of the way, on a free port
    started = ensure_ray(spec.address, owner="serve", log=log)
    try:
        if config.options.gpu:  # checked on the cluster, which may have GPUs this machine lacks
            import ray

            if ray.cluster_resources().get("GPU", 0) < 1:
                raise InputError("--gpu: the Ray cluster has no GPU; drop --gpu or join a cluster with GPUs "
                                 "(--address)")
        logging_config = {"enable_access_log": spec.access_log}
        serve.start(http_options={"host": spec.host, "port": proxy_port}, logging_config=logging_config)
        serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
        wait_healthy(spec.url, timeout_s)
    except BaseException:
        try:
            RunningServer(spec.url, started).stop()
        except Exception as cleanup:  # noqa: BLE001 - the original error is the one to report
            log(f"(cleanup after the failed start also failed: {cleanup})")
        raise
    names = ", ".join(m.name for m in config.models)
    via = f" (direct ingress; Serve's proxy on port {proxy_port})" if direct else " (through Serve's proxy)"
    log(f"serving {names} at {spec.url}{via} (docs: {spec.url}/docs)")
    return RunningServer(spec.url, started)


def serve_forever(spec: ServerSpec, log: Callable[[str], None] = print) -> None:
    """``raeflow serve`` in the foreground: start, block until Ctrl-C or SIGTERM, shut down cleanly."""
    server = start(spec, log)

    def _terminate(signum, frame):  # SIGTERM (raeflow serve --stop, a supervisor) shuts down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        server.stop()
        log("stopped")


# ------------------------------------------------------------------------------------------------- detached
def state_dir() -> Path:
    d = Path(os.environ.get("RAEFLOW_SERVE_STATE") or Path.home() / ".cache" / "raeflow" / "serve")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent: it counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _is_ours(pid: int) -> bool:
    """The pid still runs ``raeflow.serve.run`` (not a recycled pid of something else)."""
    import psutil

    try:
        return "raeflow.serve.run" in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return _alive(pid)


def spawn(spec: ServerSpec, spec_file: Path, log_path: Path) -> subprocess.Popen:
    """Run ``serve_forever(spec)`` in a child process leading its own session (its own Ray instance)."""
    spec_file.write_text(json.dumps(asdict(spec)))
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "raeflow.serve.run", str(spec_file)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def detach(spec: ServerSpec, log: Callable[[str], None] = print, timeout_s: float = 180) -> dict[str, Any]:
    """Start the server as a background process; return its state once /healthz answers."""
    spec.app_config()  # fail in the foreground on bad paths/options
    d = state_dir()
    state_file = d / f"{spec.port}.json"
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if _alive(old["pid"]) and _is_ours(old["pid"]):
            raise RunExistsError(f"a detached server already runs on port {spec.port} (pid {old['pid']}); "
                                  f"stop it with `raeflow serve --stop --port {spec.port}`")
        state_file.unlink()
    log_path = d / f"{spec.port}.log"
    proc = spawn(spec, d / f"{spec.port}.spec.json", log_path)
    state = {"pid": proc.pid, "url": spec.url, "port": spec.port, "log": str(log_path), "models": spec.models,
             "started": time.time()}
    try:
        wait_healthy(spec.url, timeout_s, alive=lambda: proc.poll() is None)
    except BaseException as e:
        terminate(proc.pid, 30)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ServerError(f"the detached server did not become healthy: {e}\n--- {log_path} ---\n{tail}") from None
    state_file.write_text(json.dumps(state))
    log(f"detached: serving at {spec.url} (pid {proc.pid}, log {log_path}); stop with "
        f"`raeflow serve --stop --port {spec.port}`")
    return state


def terminate(pid: int, grace_s: float) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL to the process group it leads if it is still there."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session (start_new_session), so pgid == pid
    except ProcessLookupError:
        pass


def stop(port: int | None = None, log: Callable[[str], None] = print, grace_s: float = 60) -> list[dict]:
    """Stop the detached server on ``port`` (or the only one running)."""
    d = state_dir()
    files = [d / f"{port}.json"] if port is not None else sorted(d.glob("[0-9]*.json"))
    files = [f for f in files if f.exists() and not f.name.endswith(".spec.json")]
    if not files:
        where = f" on port {port}" if port is not None else ""
        raise MissingFileError(f"no detached raeflow server{where} (state in {d})")
    if port is None and len(files) > 1:
        ports = ", ".join(f.stem for f in files)
        raise InputError(f"several detached servers run (ports {ports}); choose one with --port")
    stopped = []
    for f in files:
        st = json.loads(f.read_text())
        if _alive(st["pid"]) and _is_ours(st["pid"]):
            terminate(st["pid"], grace_s)
            log(f"stopped the server at {st['url']} (pid {st['pid']})")
        else:
            log(f"the server at {st['url']} (pid {st['pid']}) was no longer running")
        f.unlink()
        (d / f"{st['port']}.spec.json").unlink(missing_ok=True)
        stopped.append(st)
    return stopped


def _main(argv: list[str]) -> None:
    """The detached child: ``python -m raeflow.serve.run SPEC.json``."""
    from raeflow.raycluster import apply_env

    apply_env()  # this process never ran the `raeflow` command's callback: Ray's settings first, as there
    spec = ServerSpec(**json.loads(Path(argv[0]).read_text()))
    serve_forever(spec, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    _main(sys.argv[1:])
