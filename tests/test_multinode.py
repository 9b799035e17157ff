"""A real two-node Ray cluster on this machine, with token authentication on, and raeflow run against it.

Two ``ray start`` processes (a head and a worker node, each with 3 logical CPUs, its own ports and a private
``--temp-dir``) form the cluster; every raeflow step is a separate process that joins it with ``--address``,
as a user would: the pytest process itself never connects (it may hold the session's local Ray already, and one
process joins one Ray). In one module, in order:

1. a process joining *without* the token is refused with raeflow's explanation, not Ray's traceback;
2. ``ray job submit --working-dir . -- python jobs/embed_mnist.py``: rows in = embedded + errors;
3. ``raeflow serve --address … --replicas 2``: one replica per node, both answer;
4. ``raeflow train --address … --workers 2``: one worker per node; the worker node is SIGKILLed mid-training;
   the worker group restarts from the last checkpoint on the head alone, same world size and global batch,
   every epoch exactly once in metrics.jsonl, final validation loss within 5% of the single-node run.

The cluster never outlives the module: each ``ray start --block`` leads its own process group (every Ray daemon
and worker it spawns is in it), and teardown kills those groups, then any process still naming the private
temp dir. ``ray stop`` is never used: it would stop other people's Ray instances on this machine too.

What this cannot show (one machine, one filesystem): shared storage between machines, ``--storage-path s3://``,
GPUs per node -- the README's cluster section lists them as the first checks on a real cluster.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this venv's ray / raeflow / python: the nodes and jobs must use the same
NODE_CPUS = 3  # logical CPUs per node: two training workers (1 CPU each) plus one for Ray Data fit on either
EPOCHS = 16
# A small AE (64-128-k): the default hidden sizes make a 1.4M-parameter model, 10x slower per epoch here.
TRAIN_ARGS = ["--variant", "ae", "--dataset", "digits", "--epochs", str(EPOCHS), "--batch-size", "64",
              "--seed", "0", "--set", "train.threads=1", "--set", "model.hidden=[128]"]



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NodeExited(RuntimeError):
    pass


class TwoNodeCluster:
    """A head and one worker node started with ``ray start --block``, token authentication on."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"  # private: its own session dirs and ray_current_cluster file
        self.token_file = root / "auth_token"
        # A fresh token for this cluster only, in Ray's own format (256 random bits as hex), readable by us only.
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update({
            # Token authentication, set explicitly on every node and every process that joins (Ray's docs:
            # "configured consistently on every node"); the token from a file, never from ~/.ray (shared).
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
        })
        # Processes that join (raeflow, `ray job submit`, probes) keep raeflow's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        # which keeps a 127.0.0.1 address as it is; without it Ray rewrites 127.0.0.1 to the machine's eth0 address.
        self.env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        # The nodes must not have it: Ray 2.60 reads 0 as "no multi-node clusters" (a worker node refuses to
        # start, and the head's GCS would listen on loopback only).
        self.node_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        # Measured here at load 16-20: the head's dashboard (needed by `ray job submit`) starts ~10 module
        # processes and gave up on one after its 30 s / 60 s defaults. Generous limits; the wait is bounded anyway.
        self.node_env.update({"RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "120",
                              "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "150",
                              # Serve's proxy sends a request to a replica on its own node when there is one.
                              # On real machines each node's proxy takes its share; here both nodes share one
                              # host, only the head's proxy can hold the port, and (measured) it sent 1,102 of
                              # 1,102 requests to its local replica while the other one ran. Route by load.
                              "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"})

    # ------------------------------------------------------------------------------------------- nodes
    def _ports(self) -> list[str]:
        # Explicit free ports for everything a node listens on: two nodes share this machine (and other Ray
        # instances may run on it), so no node may take a default port.
        return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    def _start(self, name: str, args: list[str]) -> int:
        """Start one node; returns the offset of this attempt's output in its log."""
        path = self.root / f"{name}.log"
        offset = path.stat().st_size if path.exists() else 0
        self.procs[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}",
             "--object-store-memory=200000000", f"--temp-dir={self.temp_dir}", "--resources", json.dumps({name: 1}),
             "--include-log-monitor=false",  # one Python process less per node: nothing here reads worker logs live
             *self._ports(), *args],
            env=self.node_env, stdout=open(path, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        return offset

    def start(self, timeout_s: float = 180) -> None:
        # Fast node-death detection (1 s health checks, dead after 3 misses) so the restart after the worker node
        # is killed does not wait out Ray's default 15 s.
        sysconf = json.dumps({"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
        head_args = ["--head", f"--port={self.port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={_free_port()}", f"--system-config={sysconf}"]
        self._up("head", head_args, timeout_s)
        self._up("worker", [f"--address={self.address}"], timeout_s)

    def _up(self, name: str, args: list[str], timeout_s: float, attempts: int = 3) -> None:
        """Start a node and wait for ``ray start`` to report it running; retry when it aborts at start-up.

        Measured here at load 10-16 on 2 cores: a raylet waits a fixed ~15 s for its dashboard agent (a Python
        process importing Ray's dashboard modules) to report its port and aborts the node when it is later
        (``RAY_agent_register_timeout_ms`` does not govern that wait in Ray 2.60). A second attempt finds the
        modules in the page cache and usually starts in time.
        """
        for attempt in range(1, attempts + 1):
            offset = self._start(name, args)
            try:
                self.node_ids[name] = self._wait_started(name, offset, timeout_s)
                return
            except _NodeExited as e:
                self.kill(name)
                if attempt == attempts:
                    raise RuntimeError(str(e)) from None
                print(f"\n{name} node aborted at start-up (attempt {attempt}); retrying")

    def _wait_started(self, name: str, offset: int, timeout_s: float) -> str:
        """Wait for "Ray runtime started." from this attempt of ``ray start``; returns the node's id, read
        from the command line of the raylet in the node's process group (no process has to join for it)."""
        p, path = self.procs[name], self.root / f"{name}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise _NodeExited(f"ray start ({name}) exited {p.returncode}:\n{self.log_tail(name)}")
            with open(path, "rb") as f:
                f.seek(offset)
                started = b"Ray runtime started." in f.read()
            if started:
                for d in Path("/proc").iterdir():
                    try:
                        if not d.name.isdigit() or os.getpgid(int(d.name)) != p.pid:
                            continue
                        args = (d / "cmdline").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if args and args[0].endswith(b"raylet"):
                        for a in args:
                            if a.startswith(b"--node_id="):
                                return a.split(b"=", 1)[1].decode()
            time.sleep(0.5)
        self.kill(name)
        raise TimeoutError(f"{name} node not up after {timeout_s:.0f} s:\n{self.log_tail(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a node abruptly: its ``ray start`` and every process in its group (raylet, workers...)."""
        p = self.procs[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        # SIGKILL, not SIGTERM: measured here, `ray start --block` and the autoscaler monitor outlived a SIGTERM by
        # 30 s and more; nothing of this throwaway cluster needs a clean shutdown.
        for name, p in self.procs.items():
            self.kill(name)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        # Anything that left the groups (setsid'd daemons) still names our private temp dir on its command line.
        mark = str(self.temp_dir).encode()
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if mark in (d / "cmdline").read_bytes():
                        os.kill(int(d.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass

    def log_tail(self, name: str, n: int = 3000) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


@pytest.fixture(scope="module")
def cluster():
    # A short root, not pytest's tmp_path: Ray's session sockets live under --temp-dir and an AF_UNIX path may
    # not exceed 107 bytes (measured: under /tmp/pytest-of-root/pytest-N/… the dashboard's module sockets did).
    root = Path(tempfile.mkdtemp(prefix="rf2n-"))
    c = TwoNodeCluster(root)
    t0 = time.monotonic()
    try:
        c.start()
    except Exception as e:
        c.stop()  # the Ray logs stay in root for a look
        raise RuntimeError(f"the two-node cluster did not start (load average {os.getloadavg()[0]:.1f} on "
                           f"{os.cpu_count()} CPUs; Ray logs in {root}): {e}") from None
    print(f"\ntwo-node cluster up in {time.monotonic() - t0:.0f} s at {c.address}")
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory) -> tuple[Path, float]:
    """The reference: the same run (variant, data, seed, epochs, global batch) in one process on one node.
    Returns (run directory, its final validation loss); its model is also what the embed and serve steps use."""
    out = tmp_path_factory.mktemp("single") / "ae-digits"
    r = subprocess.run([str(BIN / "raeflow"), "train", *TRAIN_ARGS, "--local", "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    return out, rows[-1]["val_loss"]


def _run(cmd: list[str], env: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.ray
@pytest.mark.multinode
@pytest.mark.timeout(600)  # includes starting the cluster: ~1 min on a quiet machine, minutes at load 20
def test_joining_without_the_token_is_refused_with_advice(cluster, tmp_path):
    """A process joining with RAY_AUTH_MODE unset is refused; raeflow says how to pass the token (exit 2)."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    r = _run([str(BIN / "raeflow"), "train", "--dataset", "digits", "--epochs", "1", "--address", cluster.address,
              "-o", str(tmp_path / "refused")], env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "token authentication on" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr, r.stderr
    assert not (tmp_path / "refused").exists()  # refused before any run directory was made


@pytest.mark.ray
@pytest.mark.multinode
@pytest.mark.timeout(420)
def test_embed_job_submitted_to_the_cluster(cluster, single_node_run, tmp_path):
    """`ray job submit --working-dir .` ships the repository to the cluster; the job embeds every row."""
    model, _ = single_node_run
    out = tmp_path / "emb"
    r = _run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
              "--", "python", "jobs/embed_mnist.py", "--model", str(model), "--output", str(out),
              "--dataset", "digits", "--workers", "2"], cluster.env, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    m = re.search(r"rows in ([\d,]+) = embedded ([\d,]+) \+ errors ([\d,]+)", r.stdout)
    assert m, r.stdout[-4000:]
    rows_in, embedded, errors = (int(g.replace(",", "")) for g in m.groups())
    assert rows_in == embedded + errors and embedded > 0
    import pyarrow.parquet as pq

    from raeflow.data.images import load_digits

    assert rows_in == len(load_digits("test").x)  # every test image went in ...
    table = pq.read_table(out)
    assert table.num_rows == embedded  # ... and each embedded one is in the output once
    assert len(set(table.column("id").to_pylist())) == embedded


@pytest.mark.ray
@pytest.mark.multinode
@pytest.mark.timeout(420)
def test_serve_one_replica_per_node(cluster, single_node_run, tmp_path):
    """`raeflow serve --address … --replicas 2`: a replica on each node, and both answer requests."""
    import httpx

    model, _ = single_node_run
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "raeflow"), "serve", "--address", cluster.address, "-m", str(model),
                             "--replicas", "2", "--num-cpus", "0.5", "--port", str(port)],
                            env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("serve not healthy:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        from raeflow.data.images import load_digits

        x = load_digits("test").x[:4].reshape(4, 8, 8).tolist()  # (4, 8, 8) images in [0, 1]
        seen: dict[str, str] = {}
        answered = 0
        with httpx.Client(base_url=url, timeout=30) as http:
            # /healthz answers as soon as one replica runs; the other may still be starting (measured: 12 s and
            # more apart under load). Serve's router spreads requests over the running replicas, so ask until
            # both have answered, within a bound.
            deadline = time.monotonic() + 180
            while len(seen) < 2 and time.monotonic() < deadline:
                where = http.get("/replica").json()
                seen[where["replica"]] = where["node"]
                r = http.post(f"/{model.name}/encode", json={"images": x})
                assert r.status_code == 200, r.text
                assert len(r.json()["codes"]) == 4
                answered += 1
                time.sleep(0.1)
        print(f"\nreplicas that answered {answered} requests: {seen}")
        assert len(seen) == 2, seen  # two replicas answered ...
        assert set(seen.values()) == {cluster.node_ids["head"], cluster.node_ids["worker"]}, seen  # one per node
    finally:
        proc.send_signal(signal.SIGTERM)  # raeflow serve's clean stop: deletes its application from the cluster
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.multinode
@pytest.mark.timeout(600)
def test_train_across_nodes_survives_losing_the_worker_node(cluster, single_node_run, tmp_path):
    """One training worker per node; the worker node is SIGKILLed after epoch 3: the group restarts from the
    latest checkpoint on the head alone (2 workers, same global batch), each epoch is in metrics.jsonl once, and
    the final validation loss is within 5% of the single-node run with the same seed."""
    _, single_val = single_node_run
    out = tmp_path / "run"
    log_path = tmp_path / "train.log"
    proc = subprocess.Popen([str(BIN / "raeflow"), "train", *TRAIN_ARGS, "--workers", "2", "--address",
                             cluster.address, "--set", "ray.placement=SPREAD", "-o", str(out)],
                            env=cluster.env, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed_after = None
    try:
        deadline = time.monotonic() + 560
        while time.monotonic() < deadline and proc.poll() is None:
            rows = _rows(out)
            if len(rows) >= 3:
                cluster.kill("worker")
                killed_after = len(rows)
                break
            time.sleep(0.05)
        assert killed_after is not None, "training ended before the node could be killed:\n" + log_path.read_text()
        proc.wait(timeout=max(10.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-5000:]

    rows = _rows(out)
    head, worker = cluster.node_ids["head"], cluster.node_ids["worker"]
    # Every epoch exactly once, in order: none lost, none repeated.
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), [r["epoch"] for r in rows]
    # Before the kill: one rank per node (logged per rank, and recorded per epoch).
    assert all(sorted(r["nodes"]) == sorted([head, worker]) for r in rows[:killed_after]), rows[:killed_after]
    assert re.search(rf"rank 0/2 on node {head[:12]}|rank 1/2 on node {head[:12]}", log)
    assert re.search(rf"rank [01]/2 on node {worker[:12]}", log)
    # After: restarted once, from a checkpoint no older than the last epoch seen before the kill, on the head.
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1, resumed
    start = resumed[0]["resumed_from"]
    assert killed_after - 1 <= start <= resumed[0]["epoch"] - 1 and resumed[0]["epoch"] == start + 1
    assert all(r["nodes"] == [head, head] for r in rows[start:]), [r["nodes"] for r in rows[start:]]
    assert "restored from checkpoint at epoch" in log
    # The global batch is kept: 2 workers x 32 rows per step in every epoch, before and after.
    assert {(r["workers"], r["batch_per_worker"]) for r in rows} == {(2, 32)}
    assert all(r["weights_in_sync"] for r in rows)
    # Converged to the single-node run's loss.
    final = rows[-1]["val_loss"]
    assert abs(final - single_val) <= 0.05 * single_val, (final, single_val)
    print(f"\nnode killed after epoch {killed_after}, resumed from {start}; val_loss {final:.5f} vs single-node "
          f"{single_val:.5f}")


def _rows(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------- no cluster needed
def test_cluster_yaml_turns_token_auth_on_on_every_node():
    """cluster.yaml sets RAY_AUTH_MODE=token explicitly where each node's Ray starts, and copies one token to
    every node (file_mounts reach the head and each worker the autoscaler adds) before it starts."""
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(re.search(r"\bRAY_AUTH_MODE=token\b.*\bray start\b", c) for c in starts), key
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()


def test_auth_refusal_is_recognised_and_explained(monkeypatch):
    """How Ray 2.60 reports a join without the token (a ConnectionError raised from an AuthenticationError
    "InvalidAuthToken") is told apart from other connection failures, and the advice fits the mode in use."""
    from raeflow import raycluster

    class AuthenticationError(Exception):  # the name ray.exceptions uses; matched by name, as raycluster does
        pass

    try:
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from inner
    except ConnectionError as e:
        refused = e
    assert raycluster._auth_refused(refused)
    assert not raycluster._auth_refused(ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379"))

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    msg = raycluster.auth_help("10.0.0.1:6379")
    assert "RAY_AUTH_MODE is unset" in msg and "Set RAY_AUTH_MODE=token" in msg and "~/.ray/auth_token" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    msg = raycluster.auth_help("10.0.0.1:6379")
    assert "refused this process's token" in msg and "RAY_AUTH_TOKEN_PATH" in msg
    assert "disabled" not in msg.replace("RAY_AUTH_MODE is", "")  # never advises turning authentication off
