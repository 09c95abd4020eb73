"""Admission control through Ray Serve and real HTTP (graph/admission.py): a second application (``/admit``,
tiny-sd, one replica per stage) with ``admission.enabled`` and a fixed capacity of 4 images.

Deterministic by construction, nothing reads a clock: the flooding tenant's two long async jobs (2 images each,
150 steps) hold the whole capacity, in flight until the test cancels them. Past capacity, the flooder is over
its fair share (alone: all 4 images, and it asks more) and gets 503 ``overloaded`` with ``Retry-After`` on every
path it tries; the light tenant, with nothing in flight, is admitted: its requests wait in the ingress's fair
queue (the replica's own state says so), the flooder is still refused, and once the flooder's jobs end the light
tenant's requests all complete: 100% of what it asked.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ADMIN_TOKEN, assert_clean_error, wait_until

pytestmark = pytest.mark.e2e

APP, PREFIX = "lorafleet-admit", "/admit"  # not test_e2e_isolation.py's /admission app
HOLD = {"prompt": "holding the capacity", "steps": 150, "width": 128, "height": 128, "num_images": 2}
LIGHT = {"prompt": "a light tenant's picture", "steps": 2, "width": 64, "height": 64, "user": "light"}


@pytest.fixture(scope="module")
def admission_app(cluster, cache_dir, tmp_path_factory):
    from ray import serve

    from graph.app import build_app

    root = tmp_path_factory.mktemp("admission-app")
    config = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
        "text_encoder": {"autoscaling": None, "num_replicas": 1},
        "denoiser": {"autoscaling": None, "num_replicas": 1, "max_rows_per_tick": 8},
        "vae": {"autoscaling": None, "num_replicas": 1},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "admin": {"token": ADMIN_TOKEN},
        "jobs": {"durable": False},
        "admission": {"enabled": True, "max_images_in_flight": 4},
    }
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    url = cluster.url + PREFIX

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the admission app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield url, serve.get_deployment_handle("Ingress", app_name=APP)
    finally:
        serve.delete(APP)


def _refused(r: requests.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    if "/v1/images/" in r.url:  # OpenAI's error shape
        assert r.json()["error"]["code"] == "overloaded" and "\n" not in r.json()["error"]["message"], r.text
    else:
        assert_clean_error(r.text)
        assert r.json()["error"]["code"] == "overloaded"
    assert "overloaded" in r.text and "fair share" in r.text and "retry" in r.text
    assert "flood" not in r.text  # no tenant id


def test_a_flooding_tenant_gets_503_while_a_light_tenants_requests_all_succeed(admission_app):
    url, ingress = admission_app

    def stats() -> dict:
        (model,) = ingress.admission_stats.remote().result(timeout_s=30).values()
        return model

    flood_jobs = []
    for seed in (1, 2):  # 4 images in flight: the whole capacity
        r = requests.post(url + "/v1/jobs", json={**HOLD, "seed": seed, "user": "flood"}, timeout=60)
        assert r.status_code == 202, r.text
        flood_jobs.append(r.json()["id"])
    assert stats()["in_flight"] == {"user:flood": 4} and stats()["capacity"] == 4

    # Past capacity and over its share (alone: 4 of 4): refused early, on every path, nothing queued.
    _refused(requests.post(url + "/v1/jobs", json={**HOLD, "seed": 3, "user": "flood"}, timeout=60))
    _refused(requests.post(url + "/v1/generate", json={**LIGHT, "user": "flood"}, timeout=60))
    _refused(requests.post(url + "/v1/images/generations", json={"prompt": "p", "user": "flood"}, timeout=60))
    assert stats()["waiting"] == {}

    # The light tenant holds nothing: admitted, and its two requests (its share: 4 x 1/2) wait in fair order.
    with ThreadPoolExecutor(2) as pool:
        light = [
            pool.submit(requests.post, url + "/v1/generate", json={**LIGHT, "seed": s}, timeout=300) for s in (1, 2)
        ]
        wait_until(lambda: stats()["waiting"] == {"user:light": 2}, "the light requests to wait at the ingress")
        # The flooder's share is now 2 of 4 and it holds 4: still refused.
        _refused(requests.post(url + "/v1/generate", json={**LIGHT, "user": "flood"}, timeout=60))
        for job_id in flood_jobs:
            r = requests.delete(f"{url}/v1/jobs/{job_id}", timeout=60)
            assert r.status_code == 200, r.text
        answers = [f.result(timeout=300) for f in light]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert all(len(r.json()["images"]) == 1 for r in answers)
    wait_until(lambda: stats()["in_flight"] == {} and stats()["waiting"] == {}, "every image to leave")
