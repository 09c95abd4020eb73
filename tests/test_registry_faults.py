"""Faults: S3 down or hanging, transient S3 errors, corrupt cache files and corrupt store blobs."""

from __future__ import annotations

import socket
import threading

import pytest
from botocore.awsrequest import AWSResponse

from lora_registry import DiskCache, MemoryCache, Registry, layout, open_store
from lora_registry.errors import RegistryCorruptionError, RegistryUnavailableError

from registry_helpers import GatedStore, MotoServer, small_lora_bytes, spy_on_flight_waits

pytest_plugins = ["registry_helpers"]


def _node(store, spec, cache_dir, **kwargs) -> Registry:
    kwargs.setdefault("manifest_ttl_s", 0.0)
    return Registry(store, base=spec, cache=DiskCache(cache_dir, 1 << 30), memory=MemoryCache(1 << 30), **kwargs)


def test_s3_down_cached_versions_keep_serving(registry_tiny_spec, tmp_path):
    server = MotoServer()  # our own server: this test stops it
    uri = f"s3://{server.new_bucket()}/prod"
    options = server.store_options(connect_timeout_s=0.5, read_timeout_s=1.0, max_attempts=2)
    writer = Registry(open_store(uri, **options), base=registry_tiny_spec)
    cached = writer.register(small_lora_bytes(registry_tiny_spec, seed=1), name="cached")
    writer.register(small_lora_bytes(registry_tiny_spec, seed=2), name="uncached")
    _node(open_store(uri, **options), registry_tiny_spec, tmp_path / "node").load("cached")
    server.stop()

    # A replica restarting on the same node while S3 is down: fresh memory, same disk cache. Its clock
    # stands still, so every call below falls inside outage_backoff_s of the first failure.
    gated = GatedStore(open_store(uri, **options))
    node = _node(gated, registry_tiny_spec, tmp_path / "node", clock=lambda: 1000.0)
    manifest, adapter = node.load("cached")
    assert manifest == cached and adapter.rank == 4
    assert gated.calls == {"list": 1}  # the one try that found S3 down; the weights came from the disk cache
    assert node.load("cached@1")[1] is adapter
    assert node.fetch("cached")[1] == tmp_path / "node" / "blobs" / cached.sha256
    with pytest.raises(RegistryUnavailableError) as e:
        node.load("uncached")
    assert e.value.status == 503 and "uncached" in e.value.message
    with pytest.raises(RegistryUnavailableError):
        node.list()
    with pytest.raises(RegistryUnavailableError, match="next try in 5.0s"):
        node.register(small_lora_bytes(registry_tiny_spec, seed=3), name="new")
    # Nothing waited on S3's retries again: no call after the first reached the store.
    assert gated.calls == {"list": 1}


def test_s3_that_accepts_but_never_answers_times_out(registry_tiny_spec, tmp_path):
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        store = open_store(
            "s3://bucket/prefix",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            connect_timeout_s=0.5,
            read_timeout_s=0.5,
            max_attempts=2,
        )
        sent = []
        store.client.meta.events.register("before-send.s3", lambda request, **kwargs: sent.append(request.url))
        now = [1000.0]
        node = _node(store, registry_tiny_spec, tmp_path / "node", outage_backoff_s=30.0, clock=lambda: now[0])
        with pytest.raises(RegistryUnavailableError) as e:
            node.resolve("anything")
        assert e.value.code == "store_unreachable" and "ReadTimeoutError" in e.value.message
        # Every request ended by the read timeout, none hung: max_attempts=2 tries in all.
        assert len(sent) == 2
        now[0] += 29.9
        with pytest.raises(RegistryUnavailableError, match=r"next try in 0\.1s"):
            node.resolve("anything")
        assert len(sent) == 2  # inside outage_backoff_s: no new attempt at all
        now[0] += 0.1
        with pytest.raises(RegistryUnavailableError) as e:
            node.resolve("anything")
        assert e.value.code == "store_unreachable" and "ReadTimeoutError" in e.value.message
        assert len(sent) == 4  # the backoff is over: S3 is tried again


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **kwargs):
        yield self.body


def test_transient_s3_errors_are_retried(moto_s3, registry_tiny_spec, tmp_path):
    uri = f"s3://{moto_s3.new_bucket()}/prod"
    store = open_store(uri, **moto_s3.store_options(max_attempts=3))
    writer = Registry(store, base=registry_tiny_spec)
    m = writer.register(small_lora_bytes(registry_tiny_spec), name="w")
    seen = {"ListObjectsV2": 0, "GetObject": 0}

    def flaky(request, event_name, **kwargs):
        operation = event_name.split(".")[-1]
        seen[operation] += 1
        if seen[operation] == 1:  # the first try of each operation fails with a 500
            body = b"<Error><Code>InternalError</Code><Message>try again</Message></Error>"
            return AWSResponse(request.url, 500, {}, _Raw(body))
        return None

    node_store = open_store(uri, **moto_s3.store_options(max_attempts=3))
    for operation in seen:
        node_store.client.meta.events.register(f"before-send.s3.{operation}", flaky)
    manifest, adapter = _node(node_store, registry_tiny_spec, tmp_path / "node").load("w")
    assert manifest == m and adapter.rank == 4
    # list: 1 failure + 1 success; get: manifest (fail + ok) and blob (ok)
    assert seen == {"ListObjectsV2": 2, "GetObject": 3}


def test_corrupt_cache_file_is_fetched_again(adapter_store, registry_tiny_spec, tmp_path):
    writer = Registry(adapter_store, base=registry_tiny_spec)
    m = writer.register(small_lora_bytes(registry_tiny_spec), name="w")
    gated = GatedStore(adapter_store)
    _node(gated, registry_tiny_spec, tmp_path / "node").fetch("w")
    path = tmp_path / "node" / "blobs" / m.sha256
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # one flipped byte

    node = _node(gated, registry_tiny_spec, tmp_path / "node")  # restarted: nothing in memory
    _, adapter = node.load("w")
    assert adapter.rank == 4
    assert path.read_bytes() == good
    assert gated.calls["download"] == 2  # the first fetch and the re-fetch


def test_corrupt_store_blob_is_an_error_and_is_not_cached(adapter_store, registry_tiny_spec, tmp_path):
    writer = Registry(adapter_store, base=registry_tiny_spec)
    m = writer.register(small_lora_bytes(registry_tiny_spec, seed=1), name="w")
    other = small_lora_bytes(registry_tiny_spec, seed=2)
    adapter_store.put_bytes(layout.blob_key(m.sha256), other)
    gated = GatedStore(adapter_store)
    node = _node(gated, registry_tiny_spec, tmp_path / "node")
    with pytest.raises(RegistryCorruptionError) as e:
        node.load("w")
    assert (e.value.status, e.value.code) == (502, "corrupt_blob")
    assert gated.calls["download"] == 2  # retried once in case of damage in transit
    assert node.cache.entries() == [] and node.memory.keys() == []
    adapter_store.delete(layout.blob_key(m.sha256))
    with pytest.raises(RegistryCorruptionError) as e:
        node.load("w")
    assert e.value.code == "missing_blob"


def test_concurrent_loads_fetch_once(adapter_store, registry_tiny_spec, tmp_path, monkeypatch):
    writer = Registry(adapter_store, base=registry_tiny_spec)
    m = writer.register(small_lora_bytes(registry_tiny_spec), name="w")
    gated = GatedStore(adapter_store)
    in_download, release = threading.Event(), threading.Event()
    followers_waiting = threading.Semaphore(0)  # released once per caller waiting on the leader's load

    spy_on_flight_waits(monkeypatch, followers_waiting.release)

    def hold(key):
        in_download.set()
        assert release.wait(10)

    gated.hooks["download"] = hold
    node = _node(gated, registry_tiny_spec, tmp_path / "node")
    results = []
    threads = [threading.Thread(target=lambda: results.append(node.load("w")[1])) for _ in range(4)]
    threads[0].start()
    assert in_download.wait(10)
    for t in threads[1:]:
        t.start()
    for _ in threads[1:]:  # all three wait on the first one's load before it may finish
        assert followers_waiting.acquire(timeout=10)
    release.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert gated.calls["download"] == 1 and node.memory.loads == 1
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert node.memory.keys() == [m.sha256]
