"""Prometheus: scrape the node's metrics export port, parse the text format, and watch values move."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def scrape(cluster) -> dict[str, list]:
    text = requests.get(cluster.metrics_url, timeout=30).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def total(families, name, sample_suffix="", **labels) -> float:
    """Sum of a family's samples whose labels include ``labels``."""
    samples = families.get(name, [])
    return sum(
        s.value
        for s in samples
        if s.name == name + sample_suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for(cluster, predicate, timeout_s=45):
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(cluster)
        if predicate(families):
            return families
        if time.monotonic() > deadline:
            names = sorted(n for n in families if "lorafleet" in n or n.startswith("ray_serve"))
            raise AssertionError(f"metrics did not move in {timeout_s}s; lorafleet/serve families: {names}")
        time.sleep(1)


def test_metrics_move_after_requests(cluster):
    before = scrape(cluster)
    ok = total(before, "ray_lorafleet_requests", "_total", route="/v1/generate", status="200")
    bad = total(before, "ray_lorafleet_requests", "_total", route="/v1/generate", status="422")
    images = total(before, "ray_lorafleet_images", "_total")
    body = {"prompt": "metrics", "width": 64, "height": 64, "steps": 3, "num_images": 2}
    for seed in range(2):
        assert requests.post(cluster.url + "/v1/generate", json={**body, "seed": seed}, timeout=120).ok
    assert requests.post(cluster.url + "/v1/generate", json={"prompt": "x", "steps": 0}, timeout=30).status_code == 422

    def moved(f):
        return (
            total(f, "ray_lorafleet_requests", "_total", route="/v1/generate", status="200") >= ok + 2
            and total(f, "ray_lorafleet_requests", "_total", route="/v1/generate", status="422") >= bad + 1
            and total(f, "ray_lorafleet_images", "_total") >= images + 4
        )

    after = wait_for(cluster, moved)
    assert total(after, "ray_lorafleet_request_latency_ms", "_count", route="/v1/generate") >= 2
    for stage in ("encode", "queue", "denoise", "decode"):
        assert total(after, "ray_lorafleet_stage_latency_ms", "_count", stage=stage) >= 2
    assert total(after, "ray_lorafleet_rows_per_tick", "_count") > 0
    assert total(after, "ray_lorafleet_rows_per_tick", "_sum") >= total(after, "ray_lorafleet_rows_per_tick", "_count")
    assert total(after, "ray_lorafleet_step_latency_ms", "_count") > 0
    assert "ray_lorafleet_adapter_slots_total" in after
    # Ray Serve's own metrics are there too.
    assert any(name.startswith("ray_serve_") for name in after)


def test_tenant_label_cardinality_is_bounded():
    from deployments.metrics import LabelCap

    cap = LabelCap(limit=3)
    assert [cap(t) for t in ["a", "b", "a", "c", "d", "e", "b"]] == ["a", "b", "a", "c", "other", "other", "b"]


def test_adapter_and_registry_metrics(cluster, tiny, tmp_path):
    from lora_helpers import UNET_ATTN, make_peft_lora_file

    path = make_peft_lora_file(tiny, tmp_path, seed=41, rank=2, alpha=2, unet_targets=UNET_ATTN)
    before = scrape(cluster)
    registered = total(before, "ray_lorafleet_registry_operations", "_total", operation="register", outcome="ok")
    with open(path, "rb") as f:
        r = requests.post(
            cluster.url + "/v1/adapters",
            files={"file": ("m.safetensors", f)},
            data={"name": "metered"},
            headers=cluster.admin,
            timeout=120,
        )
    assert r.status_code == 201, r.text
    body = {"prompt": "m", "width": 64, "height": 64, "steps": 2, "loras": [{"name": "metered"}]}
    for seed in range(3):
        assert requests.post(cluster.url + "/v1/generate", json={**body, "seed": seed}, timeout=120).ok

    def moved(f):
        return (
            total(f, "ray_lorafleet_registry_operations", "_total", operation="register", outcome="ok")
            >= registered + 1
            and total(f, "ray_lorafleet_adapter_requests", "_total", adapter="metered", outcome="miss") >= 1
            and total(f, "ray_lorafleet_adapter_requests", "_total", adapter="metered", outcome="hit") >= 2
        )

    after = wait_for(cluster, moved)
    assert total(after, "ray_lorafleet_adapter_load_latency_ms", "_count") >= 1
    assert total(after, "ray_lorafleet_adapter_slots_used") >= 1
