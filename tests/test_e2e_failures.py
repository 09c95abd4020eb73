"""Replica failures under load: Serve replaces the replica; each request it held is retried once (same
seed, same image) or answered 503 — none hangs, none is lost."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import assert_clean_error

pytestmark = pytest.mark.e2e
ROUTE = "/failures"


@pytest.fixture(scope="module")
def app_url(cluster, cache_dir, tmp_path_factory):
    import yaml
    from ray import serve

    from graph.app import build_app

    from conftest import ROOT

    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    args["model"]["cache_dir"] = str(cache_dir)
    args["registry"] = {"uri": str(tmp_path_factory.mktemp("failures-registry"))}
    for name in ("text_encoder", "denoiser", "vae"):
        args[name].update({"num_replicas": 1, "autoscaling": None})
    args["admission"] = {"enabled": False}  # as the session's app (conftest.E2E_OVERRIDES)
    serve.run(build_app(args), name="failures", route_prefix=ROUTE)
    yield cluster.url + ROUTE
    serve.delete("failures")


def replica_actor(cluster, deployment: str):
    import ray
    from ray.util.state import list_actors

    alive = list_actors(
        address=cluster.dashboard_url,  # this session's instance, even if other Ray instances run on the machine
        filters=[("class_name", "=", f"ServeReplica:failures:{deployment}"), ("state", "=", "ALIVE")],
        timeout=30,
    )
    assert len(alive) == 1, alive
    return ray.get_actor(alive[0].name, namespace="serve"), alive[0].actor_id


def body(seed: int, steps: int) -> dict:
    return {"prompt": f"failure drill {seed}", "seed": seed, "steps": steps, "width": 64, "height": 64}


@pytest.mark.parametrize("deployment, steps", [("Denoiser", 40), ("TextEncoder", 6), ("VAE", 6)])
def test_killing_a_replica_under_load(app_url, cluster, deployment, steps):
    import ray
    from ray import serve
    from test_e2e_metrics import scrape, total, wait_for

    from conftest import wait_until

    retried_before = total(scrape(cluster), "ray_lorafleet_replica_failures", "_total", attempt="1")
    actor, actor_id = replica_actor(cluster, deployment)
    outcomes: list[tuple[int, int, dict | None, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int):
        seed = 1000 * k
        while not stop.is_set():
            r = requests.post(app_url + "/v1/generate", json=body(seed, steps), timeout=180)
            with lock:
                outcomes.append((seed, r.status_code, r.json(), r.text))
            seed += 1

    def successes() -> int:
        with lock:
            return sum(status == 200 for _, status, _, _ in outcomes)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, k) for k in range(6)]
        # Traffic flows through every stage, and the Denoiser holds requests (not: some seconds have passed).
        wait_until(lambda: successes() >= 1, "a first answer")
        if deployment == "Denoiser":
            denoiser = serve.get_deployment_handle("Denoiser", app_name="failures")
            wait_until(lambda: denoiser.stats.remote().result(timeout_s=30)["active"] >= 2, "requests on the Denoiser")
        ray.kill(actor, no_restart=True)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 25:
            _, new_id = (None, actor_id)
            try:
                _, new_id = replica_actor(cluster, deployment)
            except AssertionError:
                pass
            if new_id != actor_id:
                break
            time.sleep(0.5)
        # Traffic on the replacement: six more answers (not: two more seconds).
        answered = successes()
        wait_until(lambda: successes() >= answered + 6, "six answers after the replacement", timeout_s=240)
        stop.set()
        for f in futures:
            f.result(timeout=240)  # no client hangs

    statuses = [status for _, status, _, _ in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 6
    for _, status, payload, text in outcomes:
        if status == 503:
            assert payload["error"]["code"] in ("replica_failed", "overloaded")
            assert_clean_error(text)  # a replica's death shows no traceback, path, IP or actor id
    _, new_id = replica_actor(cluster, deployment)
    assert new_id != actor_id  # Serve replaced the replica
    if deployment == "Denoiser":
        # Each request holds a Denoiser replica for seconds, so several were on it when it died: they
        # were retried (and none was lost: see above). TextEncoder and VAE calls last milliseconds;
        # Serve's router mostly re-routes those itself, before the ingress sees a failure.
        wait_for(cluster, lambda f: total(f, "ray_lorafleet_replica_failures", "_total", attempt="1") > retried_before)
    # A retried request gives the same image as a fresh one with its seed.
    for seed, status, payload, _ in outcomes[:: max(1, len(outcomes) // 4)]:
        if status == 200:
            again = requests.post(app_url + "/v1/generate", json=body(seed, steps), timeout=180).json()
            assert again["images"][0]["b64"] == payload["images"][0]["b64"]


def test_jobs_outlive_a_restart_of_the_jobs_replica(app_url, cluster):
    """Job records live in the registry's store: a finished job reads the same after the Jobs replica
    is replaced, and one that was running reads failed / interrupted, never 404."""
    import ray
    from ray.util.state import list_actors

    from conftest import wait_until

    def create(steps: int, seed: int) -> str:
        r = requests.post(app_url + "/v1/jobs", json=body(seed, steps), timeout=60)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(job_id: str) -> dict:
        r = requests.get(f"{app_url}/v1/jobs/{job_id}", timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    finished = create(steps=4, seed=51)
    done = wait_until(lambda: (j := job(finished))["status"] == "done" and j, "a finished job")
    running = create(steps=150, seed=52)
    wait_until(lambda: job(running)["status"] == "running", "a running job")

    actor, actor_id = replica_actor(cluster, "Jobs")
    ray.kill(actor, no_restart=False)

    def replaced() -> bool:
        alive = list_actors(
            address=cluster.dashboard_url,
            filters=[("class_name", "=", "ServeReplica:failures:Jobs"), ("state", "=", "ALIVE")],
            timeout=30,
        )
        return bool(alive) and alive[0].actor_id != actor_id

    wait_until(replaced, "a new Jobs replica")
    after = wait_until(
        lambda: (r := requests.get(f"{app_url}/v1/jobs/{finished}", timeout=60)).status_code == 200 and r.json(),
        "the job store back",
    )
    assert after["status"] == "done" and after["images"] == done["images"] and after["seed"] == 51
    interrupted = job(running)
    assert interrupted["status"] == "failed" and interrupted["error"]["code"] == "interrupted"
    assert len(interrupted["error"]["message"]) < 200
