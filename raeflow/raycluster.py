"""Starting or joining Ray, the same way for ``train``, ``embed`` and ``serve``.

``--address auto`` / ``ray://…`` (or ``RAY_ADDRESS``) joins an existing cluster (``raeflow train`` refuses Ray
Client, ``ray://``: its Train controller would write progress on the head node); otherwise a local Ray instance
is started in this process with settings measured to work on small shared machines (a 2-core, 24 GiB VM): no
dashboard (halves the start time and memory), a bounded object store, no usage-stats upload, no per-line
print patching in Train workers, no Ray Data progress bars, and every socket on 127.0.0.1.

Ray Train V2 forwards the ``RAY_TRAIN_*`` variables it knows from the driver's environment to its controller
and workers, so setting them here (before ``ray.init``) also reaches a remote cluster's Train processes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable
from raeflow.errors import ConfigError

MiB = 2**20

#: Environment for every Ray process this package starts. ``setdefault``: a user's own value wins.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Measured with `ss -ltnp` (Ray 2.60): keeps Ray's sockets on 127.0.0.1 instead of the machine's eth0 address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # A worker group that cannot start (resources never free) fails after this long instead of hanging.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    # Train's controller takes one report per worker per poll and a worker's report waits for the previous one
    # to be taken (a queue of 1): at the default 2 s, every epoch shorter than 2 s waited for the controller and
    # each fit ended 4-5 s after its last epoch. Polling two workers 4x more often costs nothing measurable.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

#: Only for a local instance raeflow starts itself. No dashboard means nothing reads Train's metrics, and a
#: single machine that goes away takes its Ray with it, so neither earns its actor and polling per fit.
#: Worker niceness: Ray starts its workers at nice 15 (to keep its own daemons responsive on busy nodes), so on
#: a machine shared with anything else -- an editor, a second job, the plain-PyTorch baseline -- the training
#: workers got a fraction of the CPU that a plain ``python train.py`` gets (measured here, BENCHMARKS.md). A
#: local run is the user's own job: it runs at their priority.
LOCAL_ONLY_ENV = {
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_worker_niceness": "0",
}

#: A floor for the local object store: MNIST (172 MB of float32) plus its validation split fits twice over.
MIN_OBJECT_STORE = 512 * MiB

#: Who started the local instance (``ensure_ray(owner=...)``): only that owner's shutdown stops it, so a library
#: call never shuts down a Ray its caller (a test session, a script) started.
_started_by: str | None = None


def apply_env() -> None:
    """Set :data:`RAY_ENV` (user values win). Called by the ``raeflow`` command before any subcommand runs — Ray
    reads some of these once, when ``ray`` / ``ray.data`` is first imported, so they must be in place before any
    Ray module loads whatever the import order — and again by :func:`ensure_ray` for library callers."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def object_store_for(nbytes: int) -> int:
    """Local object store size for a job that puts ``nbytes`` of data into Ray: room for two copies of it,
    never under 512 MiB (the store is backed by /dev/shm pages touched only when used)."""
    return max(MIN_OBJECT_STORE, int(math.ceil(2 * nbytes / MiB)) * MiB + 128 * MiB)


def resolved_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else ``RAY_ADDRESS``; None means a local Ray instance of our own."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
               log_to_driver: bool = False, owner: str = "user", log: Callable[[str], None] = print) -> bool:
    """Make sure this process is connected to Ray; returns True when it started a local instance just now.

    An already-initialised Ray (a test session's, a notebook's) is reused as it is. ``log_to_driver`` is off by
    default: raeflow relays its own progress lines, failures come back as exceptions with the worker's
    traceback, and without the dashboard Train's placement-group cleaner would print a State-API warning every
    few seconds. Every process's log stays in ``/tmp/ray/session_latest/logs``.
    """
    global _started_by
    apply_env()  # before `import ray`: some settings are read only at its first import
    import ray

    if ray.is_initialized():
        return False
    address = resolved_address(address)
    if address:
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except ConnectionError as e:
            if _auth_refused(e):
                from raeflow.errors import ServerError

                raise ServerError(auth_help(address)) from e
            raise
        res = ray.cluster_resources()
        log(f"ray: joined cluster at {address} ({_fmt_resources(res)}, {len(ray.nodes())} node(s), token "
            f"authentication {'on' if auth_mode() == 'token' else 'off'})")
        return False
    for k, v in LOCAL_ONLY_ENV.items():
        os.environ.setdefault(k, v)
    # _node_ip_address: measured here, the env flag above alone still left raylet, GCS and Serve's replicas
    # listening on every interface; naming the loopback address moves them to 127.0.0.1 (a local instance
    # never needs to be reached from another machine).
    # address="local": a new instance of our own, always. Without it ray.init() joins whatever cluster Ray's
    # ``ray_current_cluster`` file names -- a dead one (then "object_store_memory must not be provided") or a live
    # unrelated one, silently. Joining is only ever asked for, with --address or RAY_ADDRESS.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=object_store_memory or MIN_OBJECT_STORE, log_to_driver=log_to_driver)
    _started_by = owner
    log(f"ray: started a local instance ({_fmt_resources(ray.cluster_resources())}, object store "
        f"{(object_store_memory or MIN_OBJECT_STORE) / MiB:.0f} MiB, no dashboard)")
    return True


def owns_instance() -> bool:
    """True when this process is on a local Ray instance that raeflow started (and will stop), whoever the owner."""
    import ray

    return _started_by is not None and ray.is_initialized()


def shutdown_if_started(owner: str = "user") -> None:
    """Stop the local Ray instance that ``ensure_ray(owner=owner)`` started (a joined cluster is left alone)."""
    global _started_by
    import ray

    if _started_by == owner:
        if ray.is_initialized():
            ray.shutdown()
        _started_by = None


# ------------------------------------------------------------------------------------- token authentication
#: Ray's switch for token authentication (Ray >= 2.52). It must be set the same on every node and on every
#: process that connects: Ray 2.60 turns it on by itself only for a cluster that ``ray.init()`` starts locally
#: (or ``ray start --head`` when a token file already exists), and a process joining an explicit address
#: (``--address``, ``RAY_ADDRESS``) never turns it on by itself -- it would not send the token and is refused.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: Where a process finds the token, highest precedence first (Ray's token-authentication docs): the token
#: itself, a file holding it, then the default file ``~/.ray/auth_token`` (``ray get-auth-token --generate``).
AUTH_TOKEN_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def auth_mode() -> str:
    """``token`` or ``disabled`` as this process would connect (an unset mode connects without a token)."""
    return os.environ.get(AUTH_MODE_ENV, "disabled").lower()


def auth_help(address: str) -> str:
    where = (f"{AUTH_TOKEN_ENV}, {AUTH_TOKEN_PATH_ENV}=FILE or ~/.ray/auth_token "
             "(copy the head's ~/.ray/auth_token, or `ray get-auth-token` on the head)")
    if auth_mode() != "token":
        return (f"the Ray cluster at {address} refused the connection: it has token authentication on and this "
                f"process connected without a token ({AUTH_MODE_ENV} is {os.environ.get(AUTH_MODE_ENV, 'unset')})."
                f" Set {AUTH_MODE_ENV}=token and give the cluster's token: {where}")
    return (f"the Ray cluster at {address} refused this process's token ({AUTH_MODE_ENV}=token): give the "
            f"cluster's own token through {where}")


def _auth_refused(e: BaseException) -> bool:
    """The connection failed because of token authentication (Ray raises ConnectionError from an
    AuthenticationError "InvalidAuthToken")."""
    while e is not None:
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _fmt_resources(res: dict[str, Any]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


# ------------------------------------------------------------------------------------- worker resources
@dataclass
class WorkerPlan:
    """How a data-parallel job is laid onto the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    reserved_cpus: float  # CPUs no training worker may hold: Ray Data's tasks need them
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        text = (f"{self.workers} worker(s) x {self.cpus_per_worker:g} CPU{gpu}; {self.reserved_cpus:g} CPU left "
                "for Ray Data")
        return text + "".join(f"; {n}" for n in self.notes)


def plan_workers(workers: int, cluster_cpus: float, cluster_gpus: float = 0.0, *, use_gpu: bool = False) -> WorkerPlan:
    """CPU/GPU request per worker.

    Ray Train reserves whole CPUs per worker by default, and when the workers hold every CPU, Ray Data (which
    feeds them) gets none and the job hangs: measured here, 4 workers x 0.5 CPU on 2 CPUs hang, 4 x 0.25 run.
    So one CPU (half of a single-CPU cluster) stays free for Ray Data, and when that leaves fewer CPUs than
    workers, each worker asks for an equal fraction. The CPU request only governs placement: the torch thread
    count is set separately in each worker (cores on its node / workers on its node).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if cluster_cpus <= 0:
        raise ConfigError("the Ray cluster reports no CPUs")
    gpus = 0.0
    if use_gpu:
        if cluster_gpus < 1:
            raise ConfigError(f"--gpu: the Ray cluster has no GPU ({cluster_cpus:g} CPU, 0 GPU). Drop --gpu to train "
                             "on CPU, or connect to a cluster with GPUs (--address or RAY_ADDRESS).")
        if cluster_gpus < workers:
            raise ConfigError(f"--gpu: {workers} workers need one GPU each but the Ray cluster has "
                             f"{cluster_gpus:g}; use --workers {int(cluster_gpus)} or fewer")
        gpus = 1.0
    reserve = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    budget = cluster_cpus - reserve
    notes = []
    if budget >= workers:
        cpus = 1.0  # Ray Train's own default
    else:
        # Two decimals, rounded down, so the total never exceeds the budget.
        cpus = math.floor(100 * budget / workers) / 100
        if cpus < 0.01:
            raise ConfigError(f"{workers} workers on {cluster_cpus:g} CPUs leave less than 0.01 CPU each; use fewer "
                             "--workers")
        notes.append(f"fewer CPUs ({cluster_cpus:g}) than workers + Ray Data: fractional CPUs per worker, "
                     "workers share cores")
    return WorkerPlan(workers, cpus, gpus, reserve, notes)
