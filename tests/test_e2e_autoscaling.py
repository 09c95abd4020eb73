"""GPU nodes follow the load on one machine: Ray's fake multi-node autoscaler adds a logical GPU node
when the Denoiser scales up on pending work and removes it once the replica is gone and the node idle;
no request fails on the way up or down.

The cluster is separate from the session's (`cluster` fixture): its own `ray start` processes on
free loopback ports, driven over HTTP and the CLI, never `ray.init` in this process.
autoscale/local_cluster.py ends exactly its own processes afterwards (never `ray stop`).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter

import pytest
import requests

from conftest import ROOT

sys.path.insert(0, str(ROOT / "autoscale"))
from local_cluster import LocalCluster, fake_serve_config, free_port  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP = "lorafleet"


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory, cache_dir, tiny_dir):
    work = tmp_path_factory.mktemp("fake-cluster")
    cluster = LocalCluster(
        workdir=work,
        env={"LORAFLEET_CACHE_DIR": str(cache_dir), "LORAFLEET_REGISTRY": str(work / "registry")},
    )
    try:
        cluster.start_head(num_cpus=4, autoscaling_config=ROOT / "autoscale" / "fake_cluster.yaml")
        http_port = free_port()
        url = cluster.deploy(fake_serve_config(http_port, cache_dir), http_port=http_port)
        yield cluster, url
    finally:
        ended = cluster.down()
        assert not cluster.own_processes(), f"{ended} processes ended, some survived"


class Load:
    """Client threads posting /v1/generate until stopped; every status code is counted."""

    def __init__(self, url: str, threads: int, body: dict):
        self.url, self.body = url, body
        self.codes: Counter[int] = Counter()
        self.replicas: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        seed = 1000 * k
        while not self._stop.is_set():
            seed += 1
            try:
                r = requests.post(self.url + "/v1/generate", json={**self.body, "seed": seed}, timeout=300)
                code = r.status_code
                replica = r.json()["trace"]["denoiser_replica"] if code == 200 else None
            except requests.RequestException:
                code, replica = -1, None
            with self._lock:
                self.codes[code] += 1
                if replica:
                    self.replicas.add(replica)

    def stop(self) -> Counter[int]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)
        return self.codes


def replica_failures(metrics: str) -> float:
    """ray_lorafleet_replica_failures_total summed over attempts (absent: none happened)."""
    return sum(float(v) for v in re.findall(r"^ray_lorafleet_replica_failures_total\{[^}]*\} (\S+)$", metrics, re.M))


def test_gpu_nodes_and_denoiser_replicas_follow_the_load(fake_cluster):
    cluster, url = fake_cluster
    timeline: list[tuple[float, str, int, int]] = []  # (seconds, phase, GPU nodes alive, Denoiser replicas running)
    t0 = time.monotonic()
    phase = "rest"

    def state() -> tuple[int, int]:
        nodes = len(cluster.gpu_nodes())
        replicas = len(cluster.running_replicas(APP, "Denoiser"))
        timeline.append((round(time.monotonic() - t0, 1), phase, nodes, replicas))
        return nodes, replicas

    # At rest: min_replicas 1 -> exactly one gpu_worker node (min_workers 0: none is kept for its own sake).
    cluster.wait_for(lambda: state() == (1, 1), 60, "one GPU node and one Denoiser replica at rest")

    # Heavy load: 6 clients x 2 images x 20 steps keep ~12 images pending against a target of 2 per replica.
    phase = "load"
    heavy = Load(url, threads=6, body={"prompt": "a red boat", "width": 64, "height": 64, "steps": 20, "num_images": 2})
    try:
        cluster.wait_for(lambda: state() == (2, 2), 240, "a second GPU node and a second Denoiser replica")
        nodes_of_replicas = {r["node_id"] for r in cluster.running_replicas(APP, "Denoiser")}
        assert len(nodes_of_replicas) == 2  # one replica per (single-GPU) node
        # Both replicas take traffic, and ten requests have been answered, before the load eases.
        cluster.wait_for(lambda: len(heavy.replicas) == 2, 60, "requests served by both replicas")
        cluster.wait_for(lambda: heavy.codes[200] >= 10, 240, "ten requests answered under the load")
        # Every process of the cluster listens on loopback only, but for one socket Ray Serve 2.60
        # hard-codes: each replica's inter-deployment gRPC server binds "[::]:0" (serve/_private/replica.py).
        listening = cluster.listening_addresses()
        open_wide = {
            entry
            for entry in listening
            if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1")
            and not (entry[0].startswith("ray::ServeReplica") and entry[1] == "::")
        }
        assert listening and not open_wide, open_wide
    finally:
        heavy_codes = heavy.stop()

    # A trickle (1 client, 1 image) wants one replica: Serve drains and stops one while requests keep coming.
    phase = "trickle"
    trickle = Load(url, threads=1, body={"prompt": "a small boat", "width": 64, "height": 64, "steps": 4})
    try:
        cluster.wait_for(lambda: state()[1] == 1, 120, "the Denoiser to scale back to one replica")
    finally:
        trickle_codes = trickle.stop()

    # Idle: the freed node is removed after idle_timeout_minutes (15 s); the other keeps the last replica.
    phase = "idle"
    cluster.wait_for(lambda: state() == (1, 1), 120, "the idle GPU node to be removed")

    print("\n(t_s, phase, gpu_nodes, denoiser_replicas):")
    print("\n".join(str(row) for row in _changes(timeline)))
    print(f"heavy: {dict(heavy_codes)}, trickle: {dict(trickle_codes)}")

    # Every request succeeded, during scale-up and during scale-down.
    assert set(heavy_codes) == {200} and heavy_codes[200] >= 10, heavy_codes
    assert set(trickle_codes) == {200} and trickle_codes[200] >= 1, trickle_codes
    # ... and not thanks to the ingress's one retry: no replica died under a request (it was drained).
    assert replica_failures(cluster.metrics_text()) == 0
    # The counts moved in order: 1 node / 1 replica at rest, 2 / 2 under load; under the trickle the
    # replica went first while its node stayed (drained, then idle), and the node went last.
    phases = [(p, n, r) for _, p, n, r in timeline]
    assert ("rest", 1, 1) in phases and ("load", 2, 2) in phases
    first_scaled_down = next((n, r) for p, n, r in phases if p == "trickle" and r == 1)
    assert first_scaled_down == (2, 1)
    assert phases[-1] == ("idle", 1, 1)


def _changes(timeline):
    """Only the samples where the (phase, nodes, replicas) triple changed."""
    last = None
    for row in timeline:
        if row[1:] != last:
            yield row
            last = row[1:]
