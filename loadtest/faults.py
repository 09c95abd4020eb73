"""Faults for the chaos soak (``loadtest/soak.py``): replica kills and an S3 outage.

**Replica kills.** A Serve replica is a named actor in the ``serve`` namespace,
``SERVE_REPLICA::<app>#<deployment>#<id>``; ``kill_replica`` ends one with ``ray.kill``
(as a crash would: no graceful shutdown) from the driver that owns the Ray instance, and
``wait_replaced`` waits until Serve's controller runs a replacement.

**The S3 outage.** ``OutageS3Server`` is moto's S3 server on loopback, run in this
process, whose listener can be taken down and brought back on the same port. moto keeps
its buckets and objects in this process's memory (its backends are module state, not the
HTTP server's), so a new listener in the same process serves the very same state: a moto
*process* restarted would come back empty, and moto's state API has no restore. Going
down closes the listening socket (clients get "connection refused", not a hang in the
kernel's accept backlog, which is what ``ThreadedMotoServer.stop`` leaves behind) and
resets every connection already accepted, so pooled keep-alive connections of boto3
clients in the replicas fail too: for the length of the outage, nothing reaches S3.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

SERVE_NAMESPACE = "serve"
REPLICA_PREFIX = "SERVE_REPLICA::"


# -- replicas ----------------------------------------------------------------------------------------


def replica_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of ``app/deployment`` (this driver's Ray instance)."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix)
    )


def running_replicas(app: str, deployment: str) -> int:
    """Replicas Serve's controller reports RUNNING for ``app/deployment``."""
    from ray import serve

    app_status = serve.status().applications.get(app)
    if app_status is None or deployment not in app_status.deployments:
        return 0
    return int(app_status.deployments[deployment].replica_states.get("RUNNING", 0))


def kill_replica(app: str, deployment: str, pick=min) -> str:
    """``ray.kill`` one replica of ``app/deployment`` (``pick`` chooses among the names); returns its name."""
    import ray

    names = replica_names(app, deployment)
    if not names:
        raise RuntimeError(f"no live replica of {app}/{deployment} to kill")
    name = pick(names)
    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
    return name


def wait_replaced(app: str, deployment: str, killed: str, replicas: int, timeout_s: float) -> float:
    """Wait until ``replicas`` replicas run again, none of them ``killed``; returns the seconds waited."""
    started = time.monotonic()
    while True:
        try:
            names = replica_names(app, deployment)
            if killed not in names and len(names) >= replicas and running_replicas(app, deployment) >= replicas:
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - the controller or GCS can be briefly busy right after a kill
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{app}/{deployment}: no replacement for {killed} after {timeout_s:.0f} s")
        time.sleep(0.5)


# -- S3 ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Credentials:
    endpoint_url: str
    region_name: str = "us-east-1"
    aws_access_key_id: str = "testing"
    aws_secret_access_key: str = "testing"

    def client_kwargs(self) -> dict:
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region_name,
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
        }


class OutageS3Server:
    """moto's S3 on ``127.0.0.1:port`` whose listener goes ``down()`` and comes back ``up()``, state kept.

    >>> s3 = OutageS3Server().up()          # doctest: +SKIP
    >>> s3.down(); s3.up()                  # doctest: +SKIP   same port, same buckets and objects
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        from .cluster import free_port

        self.host = host
        self.port = port if port is not None else free_port()
        self.credentials = S3Credentials(f"http://{host}:{self.port}")
        self._server = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self, timeout_s: float = 30.0) -> OutageS3Server:
        """Listen on the port again (retrying while the kernel still holds it); moto's state is this process's."""
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import ThreadedWSGIServer

        if self._server is not None:
            return self
        outer = self

        class TrackedServer(ThreadedWSGIServer):
            """werkzeug's threaded server, remembering each accepted connection so ``down`` can reset it."""

            def process_request(self, request, client_address):
                with outer._lock:
                    outer._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with outer._lock:
                    outer._connections.discard(request)
                super().shutdown_request(request)

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args, **kwargs):  # one line per S3 call would drown the soak's output
                pass

        app = DomainDispatcherApplication(create_backend_app)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                server = TrackedServer(self.host, self.port, app, handler=QuietHandler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-outage-server", daemon=True)
        self._thread.start()
        return self

    def down(self) -> int:
        """Stop listening and reset every open connection; returns how many were reset."""
        server, self._server = self._server, None
        if server is None:
            return 0
        server.shutdown()  # serve_forever returns
        server.server_close()  # the listening socket closes: new connections are refused
        with self._lock:
            open_connections, self._connections = list(self._connections), set()
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler thread's next read ends; the client sees a reset
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        return len(open_connections)

    def object_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys in ``bucket`` under ``prefix``, read from moto's in-process backend (also while down)."""
        from moto.s3.models import s3_backends

        keys = []
        for account in s3_backends.values():
            for backend in account.values():
                if bucket in backend.buckets:
                    keys += [k for k in backend.buckets[bucket].keys.keys() if k.startswith(prefix)]
        return sorted(keys)

    def object_count(self, bucket: str) -> int:
        return len(self.object_keys(bucket))
