"""A multi-node Ray cluster on one machine, owned by one process and torn down without `ray stop`.

Used by tests/test_e2e_autoscaling.py and tests/test_e2e_multinode.py, and runnable by hand:

    python autoscale/local_cluster.py demo     # fake autoscaler + lorafleet; load; GPU nodes come and go

The head is a `ray start --head` subprocess, further nodes are raylets started the way Ray's own
test utilities start them (`add_node`); all listen on 127.0.0.1 and free ports, under a private
``--temp-dir``. Each process started here (and everything Ray spawns from it: GCS, raylets,
dashboard, the autoscaler's monitor, the fake autoscaler's extra raylets, workers) inherits a
marker variable ``LORAFLEET_LOCAL_CLUSTER=<uuid>``. ``down()`` ends exactly the processes that
carry this cluster's marker, SIGTERM then SIGKILL, and removes the temp dir. `ray stop` would
end every Ray process on the machine, other people's clusters included, so it is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import requests
import yaml

MARKER = "LORAFLEET_LOCAL_CLUSTER"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """One head (optionally with the fake multi-node autoscaler) plus nodes added by hand."""

    def __init__(self, workdir: str | Path | None = None, env: dict[str, str] | None = None):
        # Short path: Ray's unix sockets live under the temp dir and sockaddr_un holds 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="lfray-"))
        self.workdir = Path(workdir) if workdir is not None else self.tmp
        self.id = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
        self.env.update(
            {
                MARKER: self.id,
                # Ray 2.60 turns token auth on for a head started with an autoscaling config;
                # a loopback-only test cluster runs without it (a shared cluster configures a token).
                "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1",
                # Replicas and handles report autoscaling metrics every second (default 10 s), so a
                # small cluster reacts within seconds (with metrics_interval_s in the Serve config,
                # which Ray 2.60 still reads).
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
            }
        )
        self.env.update(env or {})
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.metrics_ports: list[int] = []
        self.log = open(self.workdir / "ray-start.log", "ab")

    # ---- addresses -------------------------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # ---- nodes -----------------------------------------------------------------------------------------
    def _node_ports(self) -> list[str]:
        metrics = free_port()
        self.metrics_ports.append(metrics)
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={metrics}",
            "--min-worker-port=0",  # 0: any free port, never the default 10002-19999 range others use
            "--max-worker-port=0",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]

    def _ray_start(self, args: list[str], env: dict[str, str] | None) -> None:
        subprocess.run(
            [str(BIN / "ray"), "start", *args],
            env={**self.env, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=180,
        )

    def start_head(
        self,
        *,
        num_cpus: int,
        num_gpus: int = 0,
        resources: dict[str, float] | None = None,
        autoscaling_config: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start the head; with ``autoscaling_config`` (provider ``fake_multinode``) also the autoscaler."""
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.tmp}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            *self._node_ports(),
        ]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if autoscaling_config is not None:
            config = yaml.safe_load(Path(autoscaling_config).read_text())
            if config["provider"]["type"] != "fake_multinode":
                raise ValueError(f"{autoscaling_config}: provider.type must be fake_multinode on one machine")
            config["provider"]["gcs_address"] = self.gcs_address  # the fake provider's raylets join this GCS
            path = self.workdir / "autoscaling_config.yaml"
            path.write_text(yaml.safe_dump(config))
            args.append(f"--autoscaling-config={path}")
            # AUTOSCALER_UPDATE_INTERVAL_S: the monitor reconciles every second (default 5).
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
        # `ray start --node-ip-address=127.0.0.1` would swap loopback for the host's routable IP;
        # with Ray's "no multi-node clusters here" switch the head (and the fake provider's nodes,
        # started by the head's monitor) take 127.0.0.1. Nodes added with `add_node` find 127.0.0.1
        # as the address from which they reach the GCS.
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
        self._ray_start(args, env)
        self.wait_for(lambda: self._get("/api/v0/nodes") is not None, 120, "dashboard")

    def add_node(
        self,
        *,
        num_cpus: int,
        num_gpus: int = 0,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Another raylet joining the head; ``env`` reaches every worker it starts (e.g. LORAFLEET_CACHE_DIR).

        Started the way Ray's own ``cluster_utils.Cluster.add_node`` and the fake provider start nodes
        (``ray._private.node.Node``), because `ray start --address=127.0.0.1:...` rewrites a loopback
        address into the host's routable IP, where this head's GCS does not listen.
        """
        metrics = free_port()
        self.metrics_ports.append(metrics)
        spec = {
            "gcs_address": self.gcs_address,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": resources or {},
            "node_manager_port": free_port(),
            "object_manager_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "metrics_export_port": metrics,
        }
        before = len(self.alive_nodes())
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "node", json.dumps(spec)],
            env={**self.env, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=180,
        )
        self.wait_for(lambda: len(self.alive_nodes()) > before, 60, "the new node to register")

    # ---- state through the dashboard's REST API (no ray.init in the caller) --------------------------
    def _get(self, path: str):
        try:
            r = requests.get(self.dashboard_url + path, timeout=10)
        except requests.RequestException:
            return None
        return r.json() if r.status_code == 200 else None

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the state API lists them (node_id, resources_total, is_head_node, ...)."""
        body = self._get("/api/v0/nodes?limit=1000&detail=true")
        if not body:
            return []
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def gpu_nodes(self) -> list[dict]:
        return [n for n in self.alive_nodes() if n["resources_total"].get("GPU", 0) > 0]

    def deployment(self, app: str, name: str) -> dict:
        """Serve's view of one deployment: status, target_num_replicas, replicas (state, node_id)."""
        body = self._get("/api/serve/applications/") or {}
        return body.get("applications", {}).get(app, {}).get("deployments", {}).get(name, {})

    def running_replicas(self, app: str, name: str) -> list[dict]:
        return [r for r in self.deployment(app, name).get("replicas", []) if r["state"] == "RUNNING"]

    def metrics_text(self) -> str:
        """Every node's Prometheus metrics export, concatenated."""
        parts = []
        for port in self.metrics_ports:
            try:
                parts.append(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            except requests.RequestException:
                pass
        return "\n".join(parts)

    # ---- Serve ----------------------------------------------------------------------------------------
    def deploy(self, serve_config: dict, *, http_port: int, timeout_s: float = 300) -> str:
        """`serve deploy` a config (a dict, written to the work dir), wait for /readyz; return the URL."""
        path = self.workdir / "serve_config.yaml"
        path.write_text(yaml.safe_dump(serve_config, sort_keys=False))
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "-a", self.dashboard_url],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )
        url = f"http://127.0.0.1:{http_port}"

        def ready():
            try:
                return requests.get(url + "/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        self.wait_for(ready, timeout_s, "lorafleet /readyz")
        return url

    # ---- waiting and teardown -------------------------------------------------------------------------
    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(interval_s)

    def own_processes(self) -> list[psutil.Process]:
        """Processes carrying this cluster's marker in their environment (never this process)."""
        mine = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get(MARKER) == self.id:
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return mine

    def listening_addresses(self) -> set[tuple[str, str, int]]:
        """(process name, IP, port) of every socket this cluster's processes listen on."""
        pids = {proc.pid for proc in self.own_processes()}
        found = set()
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
                try:
                    found.add((psutil.Process(conn.pid).name(), conn.laddr.ip, conn.laddr.port))
                except psutil.NoSuchProcess:
                    continue
        return found

    def down(self, grace_s: float = 10.0) -> int:
        """End this cluster's processes (SIGTERM, then SIGKILL after ``grace_s``); return how many."""
        procs = self.own_processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        # The fake provider's raylets are started by the monitor, which may have launched one more
        # between the scan and its own end: scan again.
        late = self.own_processes()
        for proc in late:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(late, timeout=5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return len(procs) + len(late)


def fake_serve_config(http_port: int, cache_dir: str | Path) -> dict:
    """autoscale/serve_config.fake.yaml with this run's HTTP port and model cache."""
    config = yaml.safe_load((HERE / "serve_config.fake.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config["applications"][0]["args"]["model"]["cache_dir"] = str(cache_dir)
    return config


def _demo() -> None:
    """Start the fake autoscaling cluster, deploy lorafleet, load it, print nodes and replicas."""
    import threading

    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=4, autoscaling_config=HERE / "fake_cluster.yaml")
        http_port = free_port()
        url = cluster.deploy(fake_serve_config(http_port, cluster.tmp / "models"), http_port=http_port)
        print(f"lorafleet at {url}, dashboard {cluster.dashboard_url}")
        stop = threading.Event()

        def load():
            body = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 20, "num_images": 2}
            while not stop.is_set():
                try:
                    requests.post(url + "/v1/generate", json=body, timeout=600)
                except requests.RequestException:
                    return  # the cluster is going down

        threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        for second in range(240):
            if second == 90:
                print("stopping load")
                stop.set()
            replicas = len(cluster.running_replicas("lorafleet", "Denoiser"))
            print(f"t={second:3d}s gpu nodes={len(cluster.gpu_nodes())} denoiser replicas={replicas}", flush=True)
            time.sleep(1)
    finally:
        print(f"ended {cluster.down()} processes")


def _start_node(spec: dict) -> None:
    """Start a raylet (and its agents) on 127.0.0.1 that joins ``spec["gcs_address"]``, then return."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        node_ip_address="127.0.0.1",
        gcs_address=spec["gcs_address"],
        redis_address=spec["gcs_address"],
        num_cpus=spec["num_cpus"],
        num_gpus=spec["num_gpus"],
        resources=spec["resources"],
        node_manager_port=spec["node_manager_port"],
        object_manager_port=spec["object_manager_port"],
        dashboard_agent_listen_port=spec["dashboard_agent_listen_port"],
        runtime_env_agent_port=spec["runtime_env_agent_port"],
        metrics_export_port=spec["metrics_export_port"],
        min_worker_port=0,
        max_worker_port=0,
        object_store_memory=200_000_000,
    )
    # The processes outlive this launcher (no reaper, no shutdown hook); LocalCluster.down() ends them.
    Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"] and len(sys.argv) == 3:
        _start_node(json.loads(sys.argv[2]))
    elif sys.argv[1:] == ["demo"]:
        _demo()
    else:
        sys.exit(__doc__)
