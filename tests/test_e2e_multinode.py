"""Multi-node correctness: two Denoiser replicas on two Ray nodes share the registry's S3 store (moto on
loopback) and each keeps its own disk cache.

Three `ray start` processes on one machine: a head (CPUs only: Ingress, TextEncoder, VAE) and two
nodes with one logical GPU each and their own LORAFLEET_CACHE_DIR, so the two single-GPU Denoiser
replicas land one per node and each node's workers see their own cache directory, as on separate
machines. The cluster is separate from the session's; autoscale/local_cluster.py ends its processes.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import requests

from conftest import ROOT
from lora_helpers import UNET_ATTN, make_peft_lora_file

sys.path.insert(0, str(ROOT / "autoscale"))
from local_cluster import LocalCluster, fake_serve_config, free_port  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP = "lorafleet"
BUCKET = "lorafleet-multinode"
TOKEN = "multinode-admin-token"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, cache_dir, tiny_dir, s3_server):
    work = tmp_path_factory.mktemp("multinode")
    boto3.client("s3", **s3_server).create_bucket(Bucket=BUCKET)
    caches = {name: work / f"cache-{name}" for name in ("head", "a", "b")}
    cluster = LocalCluster(
        workdir=work,
        # boto3's credential chain in every worker finds moto's dummy keys.
        env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "LORAFLEET_ADMIN_TOKEN": TOKEN},
    )
    try:
        cluster.start_head(num_cpus=4, env={"LORAFLEET_CACHE_DIR": str(caches["head"])})
        for name in ("a", "b"):
            cluster.add_node(num_cpus=0, num_gpus=1, env={"LORAFLEET_CACHE_DIR": str(caches[name])})
        http_port = free_port()
        config = fake_serve_config(http_port, cache_dir)  # the model from the session's cache, read-only
        args = config["applications"][0]["args"]
        # Two replicas, one GPU each: one per node. Two requests at a time each, so a burst spreads.
        args["denoiser"].update({"autoscaling": None, "num_replicas": 2, "max_ongoing_requests": 2})
        args["registry"] = {  # no cache_dir: each node's default, $LORAFLEET_CACHE_DIR/adapters
            "uri": f"s3://{BUCKET}/adapters",
            "s3_endpoint_url": s3_server["endpoint_url"],
            "s3_region": s3_server["region_name"],
            "manifest_ttl_s": 1.0,
        }
        url = cluster.deploy(config, http_port=http_port)
        # /readyz answers once one Denoiser replica is ready; the tests need both.
        cluster.wait_for(lambda: len(cluster.running_replicas(APP, "Denoiser")) == 2, 300, "two Denoiser replicas")
        yield cluster, url, caches, s3_server
    finally:
        cluster.down()
        assert not cluster.own_processes()


def test_replicas_on_two_nodes_share_s3_and_keep_their_own_disk_cache(two_nodes, tiny, tmp_path):
    cluster, url, caches, s3 = two_nodes
    replicas = cluster.running_replicas(APP, "Denoiser")
    node_of = {r["replica_id"]: r["node_id"] for r in replicas}
    assert len(node_of) == 2 and len(set(node_of.values())) == 2  # one Denoiser replica per node

    path = make_peft_lora_file(tiny, tmp_path, seed=5, rank=4, alpha=4, unet_targets=UNET_ATTN)
    with open(path, "rb") as f:
        r = requests.post(
            url + "/v1/adapters",
            files={"file": ("shared.safetensors", f)},
            data={"name": "shared"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]

    def generate(seed: int) -> dict:
        body = {"prompt": "shared style", "seed": seed, "steps": 20, "width": 64, "height": 64}
        body["loras"] = [{"name": "shared"}]
        # With the admin token the trace names replicas by their Serve ids (others see aliases).
        r = requests.post(url + "/v1/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["trace"]

    traces: list[dict] = []
    for burst in range(3):  # the replica holding the adapter fills up (2 at a time): the other loads it too
        with ThreadPoolExecutor(8) as pool:
            traces += pool.map(generate, range(100 * burst, 100 * burst + 8))
        if len({t["denoiser_replica"] for t in traces}) == 2:
            break
    served = {t["denoiser_replica"] for t in traces}
    assert served == set(node_of), (served, node_of)  # both replicas, i.e. both nodes, served the adapter
    loads = {rid: max(t["denoiser_adapter_loads"] for t in traces if t["denoiser_replica"] == rid) for rid in served}
    assert loads == {rid: 1 for rid in served}  # each replica loaded it once, from its own node's cache

    # One object in the shared store ...
    listing = boto3.client("s3", **s3).list_objects_v2(Bucket=BUCKET, Prefix="adapters/blobs/")
    assert [o["Key"] for o in listing.get("Contents", [])] == [f"adapters/blobs/{sha}.safetensors"]
    # ... and one verified copy in each node's disk cache, where that node's workers put it.
    blobs = {name: caches[name] / "adapters" / "blobs" / sha for name in ("a", "b")}
    for name, blob in blobs.items():
        elsewhere = sorted(str(p) for p in caches["head"].parent.glob("cache-*/adapters/blobs/*"))
        assert blob.is_file(), f"node {name} has no {blob}; copies: {elsewhere}"
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    assert blobs["a"].stat().st_ino != blobs["b"].stat().st_ino
