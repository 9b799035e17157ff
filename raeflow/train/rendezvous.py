"""torch.distributed's sockets, bound to the node's own address instead of every interface.

Ray Train's default ``TorchConfig`` has rank 0 start torch's ``TCPStore`` (the rendezvous key-value server) on a
free port, and ``TCPStore`` listens on *all* interfaces whatever ``MASTER_ADDR`` says; gloo then opens its pair
sockets on the address the host name resolves to (often the machine's external one). Measured here with
``ss -ltnp`` during ``raeflow train --workers 2`` on a local Ray instance: a training worker listening on ``*``.

:class:`NodeLocalTorchConfig` sets the process group up the same way, with two differences for gloo (CPU):

* rank 0 first binds a listening socket to its node's address (127.0.0.1 for the local instance raeflow starts)
  and hands it to a ``TCPStore`` as ``master_listen_fd``; that store is ``multi_tenant``, so the store
  ``init_process_group`` creates on the same port reuses it instead of binding ``*`` (torch keeps one server per
  port per process);
* every worker's ``GLOO_SOCKET_IFNAME`` names the interface that holds its node's address (``lo`` locally).

GPU (NCCL) and TPU groups and a user's ``init_method="tcp"`` take Ray's own path unchanged. This reimplements
the gloo branch of Ray 2.60's ``_TorchBackend.on_start`` (``ray/train/torch/config.py``); the functions it calls
are Ray's own.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

#: The TCPStore and its socket live as long as the worker process (the process group refers to them).
_KEEP: list = []


def _interface_of(addr: str) -> str | None:
    """Name of the network interface holding ``addr`` (``lo`` for 127.0.0.1), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


def _host_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: a TCPStore server listening on this node's address only; returns (address, port)."""
    from torch.distributed import TCPStore

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = TCPStore(addr, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                     wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    _KEEP.append((sock, store))
    return addr, port


def _set_env(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    ifname = _interface_of(ray.util.get_node_ip_address())
    if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname  # gloo's pair sockets on this node's address, not the hostname's


class _NodeLocalBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        res = worker_group.get_resources_per_worker()
        gloo = (backend_config.backend in (None, "gloo") and not res.get("GPU", 0) and not res.get("TPU", 0)
                and backend_config.init_method == "env")
        if not gloo:
            return super().on_start(worker_group, backend_config)
        n = len(worker_group)
        addr, port = worker_group.execute_single(0, _host_store, world_size=n, timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_env, addr=addr, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend="gloo", world_rank=i,
                                                   world_size=n, init_method="env://",
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])


@dataclass
class NodeLocalTorchConfig(TorchConfig):
    """``TorchConfig`` whose CPU (gloo) process group listens on the node's address only (see module doc)."""

    @property
    def backend_cls(self):
        return _NodeLocalBackend
