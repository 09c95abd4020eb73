"""Routing with Serve multiplexing on two Denoiser replicas: requests for an adapter go where it is
resident (the load counter stops growing), yet a hot adapter spreads when its replica is busy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from lora_helpers import UNET_ATTN, make_peft_lora_file

pytestmark = pytest.mark.e2e
ROUTE = "/routing"


@pytest.fixture(scope="module")
def two_replicas(cluster, cache_dir, tmp_path_factory, tiny):
    """A second app in the same Ray instance: two Denoiser replicas that each take two requests at a time,
    sharing the first app's S3 registry (adapters registered through one app are usable in the other)."""
    import yaml
    from ray import serve

    from graph.app import build_app

    from conftest import ROOT

    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    args["model"]["cache_dir"] = str(cache_dir)
    args["registry"] = {
        "uri": "s3://lorafleet-e2e/adapters",
        "s3_endpoint_url": cluster.s3["endpoint_url"],
        "s3_region": cluster.s3["region_name"],
        "cache_dir": str(tmp_path_factory.mktemp("routing-adapter-cache")),
    }
    args["admin"] = {"token": "e2e-admin-token"}
    args["denoiser"].update({"num_replicas": 2, "max_ongoing_requests": 2, "autoscaling": None})
    for name in ("text_encoder", "vae"):
        args[name].update({"num_replicas": 1, "autoscaling": None})
    args["admission"] = {"enabled": False}  # as the session's app (conftest.E2E_OVERRIDES)
    serve.run(build_app(args), name="routing", route_prefix=ROUTE)
    path = make_peft_lora_file(tiny, tmp_path_factory.mktemp("hot"), seed=31, rank=4, alpha=4, unet_targets=UNET_ATTN)
    with open(path, "rb") as f:
        r = requests.post(
            cluster.url + "/v1/adapters",
            files={"file": ("hot.safetensors", f)},
            data={"name": "hot"},
            headers=cluster.admin,
            timeout=120,
        )
    assert r.status_code == 201, r.text
    yield cluster.url + ROUTE
    serve.delete("routing")


def gen(url, seed, steps=4):
    body = {"prompt": "hot style", "seed": seed, "steps": steps, "width": 64, "height": 64, "loras": [{"name": "hot"}]}
    r = requests.post(url + "/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["trace"]


def test_repeated_requests_go_where_the_adapter_is(two_replicas):
    traces = [gen(two_replicas, seed) for seed in range(6)]
    assert len({t["denoiser_replica"] for t in traces}) == 1  # without routing: 1 in 32 chance
    assert [t["denoiser_adapter_loads"] for t in traces] == [1] * 6  # loaded once, then hits


def test_a_hot_adapter_spreads_over_busy_replicas(two_replicas):
    with ThreadPoolExecutor(10) as pool:
        traces = list(pool.map(lambda s: gen(two_replicas, 100 + s, steps=20), range(10)))
    replicas = {t["denoiser_replica"] for t in traces}
    assert len(replicas) == 2  # the replica holding it was full: the other loaded it too
    assert max(t["denoiser_adapter_loads"] for t in traces) == 1  # each replica loaded it once
