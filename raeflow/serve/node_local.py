"""Ray Serve 2.60's one socket on every interface, moved to the node's own address.

Each Serve replica starts a gRPC server "for inter-deployment communication" bound to ``[::]:0`` -- hard-coded in
``ray/serve/_private/replica.py`` (``add_port_to_grpc_server(self._server, "[::]:0")``), with no option or
environment variable to change it. Measured here (tests/test_hostile.py's socket test): with everything else of
Ray and Serve on 127.0.0.1, the replica was the one process listening on ``:::PORT``.

Other replicas and handles reach that server at the replica's node address (the address Ray registered for the
node), so binding exactly that address loses nothing: 127.0.0.1 on the local instance raeflow starts, the node's
cluster address on a cluster. :func:`bind_replica_grpc_to_node` wraps the function the replica module calls, in
the replica's own process, before Serve calls it (a deployment's constructor runs before the replica's
``_on_initialized``). If a later Ray renames the function, nothing is patched and a warning is logged: the socket
test then names the socket again.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def bind_replica_grpc_to_node() -> bool:
    """Make this replica's inter-deployment gRPC server listen on the node's address; True when patched."""
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - Serve not installed
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_raeflow_node_local", False):
        if original is None:
            log.warning("ray.serve._private.replica.add_port_to_grpc_server not found: the replica's gRPC server "
                        "keeps Serve's [::] bind")
        return original is not None
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def node_local(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    node_local._raeflow_node_local = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = node_local
    return True
