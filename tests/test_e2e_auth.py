"""Tenant keys and quotas through Ray Serve and real HTTP: a second application (``/auth``, tiny-sd, one
replica per stage) with ``auth.require_keys``; keys made with the admin API; 401s, 429s with Retry-After,
images in flight held by a running job, revocation, and the tenant's 429 in Prometheus."""

from __future__ import annotations

import pytest
import requests
from test_e2e_metrics import scrape, total, wait_for

from conftest import ADMIN_TOKEN, assert_clean_error, wait_until

pytestmark = pytest.mark.e2e

AUTH_APP, AUTH_PREFIX = "lorafleet-auth", "/auth"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
QUICK = {"prompt": "a key's picture", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def auth_app(cluster, cache_dir, tmp_path_factory):
    from ray import serve

    from graph.app import build_app

    root = tmp_path_factory.mktemp("auth-app")
    config = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
        "text_encoder": {"autoscaling": None, "num_replicas": 1},
        "denoiser": {"autoscaling": None, "num_replicas": 1, "max_rows_per_tick": 8},
        "vae": {"autoscaling": None, "num_replicas": 1},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "admin": {"token": ADMIN_TOKEN},
        "auth": {"require_keys": True, "key_cache_ttl_s": 0, "default_quota": {"rate_per_s": 100, "burst": 100}},
    }
    serve.run(build_app(config), name=AUTH_APP, route_prefix=AUTH_PREFIX)
    url = cluster.url + AUTH_PREFIX

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the keyed app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield url
    finally:
        serve.delete(AUTH_APP)


def new_key(url: str, name: str, **fields) -> str:
    r = requests.post(url + "/v1/admin/keys", json={"name": name, **fields}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_401_429_in_flight_revocation_and_metrics(auth_app, cluster):
    url = auth_app
    # No key, a made-up one: 401, one clean line.
    for headers in ({}, bearer("lf_made-up")):
        r = requests.post(url + "/v1/generate", json=QUICK, headers=headers, timeout=60)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
        assert_clean_error(r.text)
    r = requests.post(
        url + "/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "width": 64, "height": 64}, timeout=60
    )
    assert r.status_code == 401

    alice = new_key(url, "alice")
    r = requests.post(url + "/v1/generate", json=QUICK, headers={**bearer(alice), "Accept": "image/png"}, timeout=120)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = requests.post(
        url + "/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "width": 64, "height": 64}, headers=bearer(alice),
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200 and len(r.json()["images"]) == 1

    # The official OpenAI client sends its api_key as the bearer key.
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=alice, max_retries=0)
    answer = client.images.generate(prompt="p", size="64x64", extra_body={"steps": 2})
    assert len(answer.data) == 1 and answer.data[0].b64_json
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="lf_made-up", max_retries=0).images.generate(prompt="p")
    assert e.value.status_code == 401 and e.value.body["message"] == "unknown API key"

    # Over the rate: 429 with Retry-After and the limit named; not a 503.
    slow = new_key(url, "slow", quota={"rate_per_s": 0.001, "burst": 2})
    codes = [requests.post(url + "/v1/generate", json=QUICK, headers=bearer(slow), timeout=120) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) >= 900
    assert codes[2].json()["error"]["message"] == "rate limit: 0.001 requests/s for key 'slow'"

    # Images in flight: a running job holds its image until it ends; a second request meanwhile gets 429.
    one = new_key(url, "one", quota={"max_images_in_flight": 1})
    job = requests.post(
        url + "/v1/jobs", json={**QUICK, "steps": 150, "width": 128, "height": 128}, headers=bearer(one), timeout=60
    )
    assert job.status_code == 202, job.text
    r = requests.post(url + "/v1/generate", json=QUICK, headers=bearer(one), timeout=60)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["message"] == "images in flight limit: 1 for key 'one' (1 generating, 1 asked)"
    r = requests.delete(url + f"/v1/jobs/{job.json()['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    wait_until(
        lambda: requests.post(url + "/v1/generate", json=QUICK, headers=bearer(one), timeout=120).status_code == 200,
        "the cancelled job's image to be released",
    )

    # Revoked: 401 from the next request on (key_cache_ttl_s: 0).
    assert requests.delete(url + "/v1/admin/keys/alice", headers=ADMIN, timeout=30).json()["revoked"] is True
    r = requests.post(url + "/v1/generate", json=QUICK, headers=bearer(alice), timeout=60)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]

    # The tenant's 429 in Prometheus, by its name; never a key.
    def counted(f) -> bool:  # each counter as it was exported (every second): wait for all three
        return (
            total(f, "ray_lorafleet_tenant_requests", "_total", tenant="key:slow", outcome="rate_limited") >= 1
            and total(f, "ray_lorafleet_tenant_requests", "_total", tenant="key:one", outcome="in_flight_limited") >= 1
            and total(f, "ray_lorafleet_tenant_images", "_total", tenant="key:alice") >= 1
        )

    after = wait_for(cluster, counted)
    assert total(after, "ray_lorafleet_tenant_requests", "_total", tenant="key:slow", outcome="rate_limited") == 1
    text = requests.get(cluster.metrics_url, timeout=30).text
    assert not [k for k in (alice, slow, one) if k in text or k[3:15] in text]
    assert scrape(cluster)  # still parses
