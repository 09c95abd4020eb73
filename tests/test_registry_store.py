"""The registry on both stores (a local directory and moto's S3 server): lifecycle, races, interruptions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from lora_registry import DiskCache, MemoryCache, Registry, layout
from lora_registry.errors import AdapterNotFoundError, RegistryConflictError

from registry_helpers import GatedStore, make_store, small_lora_bytes, store_keys

pytest_plugins = ["registry_helpers"]


def _registry(store, spec, tmp_path, name="node", **kwargs) -> Registry:
    kwargs.setdefault("manifest_ttl_s", 0.0)
    return Registry(store, base=spec, cache=DiskCache(tmp_path / name, 1 << 30), memory=MemoryCache(1 << 30), **kwargs)


def test_register_resolve_list_delete(adapter_registry, registry_tiny_spec):
    reg = adapter_registry
    m1 = reg.register(
        small_lora_bytes(registry_tiny_spec, seed=1),
        name="watercolor",
        description="soft washes",
        trigger_words=["wc style"],
        tags=["art"],
    )
    m2 = reg.register(small_lora_bytes(registry_tiny_spec, seed=2), name="watercolor")
    m3 = reg.register(small_lora_bytes(registry_tiny_spec, seed=3), name="pixel", tags=["art", "retro"])
    assert (m1.ref, m2.ref, m3.ref) == ("watercolor@1", "watercolor@2", "pixel@1")
    assert (m1.description, m1.trigger_words, m1.tags) == ("soft washes", ("wc style",), ("art",))
    assert m1.base_model.fingerprint == registry_tiny_spec.fingerprint
    assert m1.sha256 != m2.sha256 and m1.size_bytes > 0

    assert reg.resolve("watercolor") == m2
    assert reg.resolve("watercolor@1") == m1
    listings, cursor = reg.list()
    assert [(e.name, e.latest.version, e.versions) for e in listings] == [("pixel", 1, (1,)), ("watercolor", 2, (1, 2))]
    assert cursor is None
    assert [e.name for e in reg.list(tag="retro")[0]] == ["pixel"]
    assert [m.ref for m in reg.versions("watercolor")] == ["watercolor@1", "watercolor@2"]

    assert [m.ref for m in reg.delete("watercolor@2")] == ["watercolor@2"]
    assert reg.resolve("watercolor") == m1  # latest live version
    with pytest.raises(AdapterNotFoundError, match="was deleted; the latest is watercolor@1"):
        reg.resolve("watercolor@2")
    m4 = reg.register(small_lora_bytes(registry_tiny_spec, seed=4), name="watercolor")
    assert m4.version == 3  # version numbers are never reused
    assert [m.ref for m in reg.delete("watercolor")] == ["watercolor@1", "watercolor@3"]
    with pytest.raises(AdapterNotFoundError, match="all its versions are deleted"):
        reg.resolve("watercolor")
    with pytest.raises(AdapterNotFoundError):
        reg.delete("watercolor")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        reg.resolve("nope")
    assert [e.name for e in reg.list()[0]] == ["pixel"]


def test_store_layout_after_registration(adapter_registry, registry_tiny_spec):
    m = adapter_registry.register(small_lora_bytes(registry_tiny_spec), name="w")
    adapter_registry.delete("w@1")
    assert store_keys(adapter_registry.store) == [
        "adapters/w/00000001.deleted",
        "adapters/w/00000001.json",
        f"blobs/{m.sha256}.safetensors",
    ]


def test_list_pages(adapter_registry, registry_tiny_spec):
    data = small_lora_bytes(registry_tiny_spec)
    for name in ["e", "a", "d", "c", "b"]:
        adapter_registry.register(data, name=name)
    page, cursor = adapter_registry.list(limit=2)
    assert [e.name for e in page] == ["a", "b"] and cursor == "b"
    page, cursor = adapter_registry.list(limit=2, after=cursor)
    assert [e.name for e in page] == ["c", "d"] and cursor == "d"
    page, cursor = adapter_registry.list(limit=2, after=cursor)
    assert [e.name for e in page] == ["e"] and cursor is None
    with pytest.raises(ValueError, match="limit"):
        adapter_registry.list(limit=0)


def test_fetch_and_load_use_the_caches(adapter_store, registry_tiny_spec, tmp_path):
    writer = _registry(adapter_store, registry_tiny_spec, tmp_path, "writer")
    m = writer.register(small_lora_bytes(registry_tiny_spec), name="w")
    gated = GatedStore(adapter_store)
    replica = _registry(gated, registry_tiny_spec, tmp_path, "replica")

    manifest, path = replica.fetch("w")
    assert manifest == m and path == tmp_path / "replica" / "blobs" / m.sha256
    assert gated.calls["download"] == 1
    _, adapter = replica.load("w@1")
    _, again = replica.load("w")
    assert again is adapter and replica.memory.keys() == [m.sha256]
    assert gated.calls["download"] == 1  # disk, then memory
    assert adapter.rank == 4 and sorted(adapter.modules) == list(m.target_modules)


def test_two_registrations_racing_for_one_version(adapter_store, registry_tiny_spec, tmp_path):
    """Both read the same listing (next version: 1) and write the manifest at once: one gets 1, the other 2."""
    gated = GatedStore(adapter_store)
    barrier = threading.Barrier(2, timeout=10)
    first_try = threading.local()

    def at_manifest_write(key):
        if not getattr(first_try, "done", False):
            first_try.done = True
            barrier.wait()

    gated.hooks["put_if_absent"] = at_manifest_write
    regs = [_registry(gated, registry_tiny_spec, tmp_path, f"node{i}") for i in range(2)]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = regs[i].register(small_lora_bytes(registry_tiny_spec, seed=i), name="race")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(m.version for m in results.values()) == [1, 2]
    assert gated.calls["put_if_absent"] == 3  # two at version 1 (one lost), the loser's retry at 2
    by_version = {m.version: m for m in results.values()}
    reader = _registry(adapter_store, registry_tiny_spec, tmp_path, "reader")
    assert reader.resolve("race@1") == by_version[1] and reader.resolve("race@2") == by_version[2]
    assert [e.versions for e in reader.list()[0]] == [(1, 2)]


def test_many_concurrent_registrations_get_distinct_versions(adapter_store, registry_tiny_spec, tmp_path):
    start = threading.Barrier(6, timeout=10)
    reg = _registry(adapter_store, registry_tiny_spec, tmp_path)
    data = [small_lora_bytes(registry_tiny_spec, seed=i) for i in range(6)]
    results = []

    def run(i):
        start.wait()
        results.append(reg.register(data[i], name="crowd"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(m.version for m in results) == [1, 2, 3, 4, 5, 6]
    assert {m.version: m.sha256 for m in results} == {m.version: m.sha256 for m in reg.versions("crowd")}


def test_readers_during_a_registration(adapter_store, registry_tiny_spec, tmp_path):
    writer_store = GatedStore(adapter_store)
    writer = _registry(writer_store, registry_tiny_spec, tmp_path, "writer")
    reader = _registry(adapter_store, registry_tiny_spec, tmp_path, "reader")
    v1 = writer.register(small_lora_bytes(registry_tiny_spec, seed=1), name="w")

    at_manifest, release = threading.Event(), threading.Event()

    def hold(key):
        at_manifest.set()
        assert release.wait(10)

    writer_store.hooks["put_if_absent"] = hold
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault("m", writer.register(small_lora_bytes(registry_tiny_spec, seed=2), name="w"))
    )
    t.start()
    assert at_manifest.wait(10)
    # Weights are uploaded (staging + blob), the manifest is not: readers see version 1 only.
    assert any(k.startswith(layout.STAGING_PREFIX) for k in store_keys(adapter_store))
    assert reader.resolve("w") == v1
    assert [e.versions for e in reader.list()[0]] == [(1,)]
    with pytest.raises(AdapterNotFoundError):
        reader.resolve("w@2")
    _, adapter = reader.load("w")
    assert reader.memory.keys() == [v1.sha256]
    release.set()
    t.join(10)
    assert reader.resolve("w") == result["m"] and result["m"].version == 2
    assert not any(k.startswith(layout.STAGING_PREFIX) for k in store_keys(adapter_store))


def test_failure_before_the_manifest_leaves_nothing_visible(adapter_store, registry_tiny_spec, tmp_path):
    gated = GatedStore(adapter_store)
    reg = _registry(gated, registry_tiny_spec, tmp_path)

    def crash(key):
        raise RuntimeError("node lost power")

    gated.hooks["put_if_absent"] = crash
    with pytest.raises(RuntimeError):
        reg.register(small_lora_bytes(registry_tiny_spec), name="w")
    assert reg.list() == ([], None)
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("w")
    keys = store_keys(adapter_store)
    assert [k.split("/")[0] for k in keys] == ["blobs"]  # staging removed; the blob is unreferenced
    report = reg.gc(staging_older_than_s=0, blobs_older_than_s=0)
    assert report.blobs == keys and report.staging == []
    assert store_keys(adapter_store) == []


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from lora_registry import Registry, base_model_spec_from_dir, open_store
    from lora_registry.stores.base import Store

    uri, model_dir, lora, endpoint = sys.argv[1:5]
    options = {}
    if endpoint:
        options = dict(endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                       region_name="us-east-1")
    store = open_store(uri, **options)
    kind = type(store)
    kind.put_if_absent = lambda self, key, data: os.kill(os.getpid(), signal.SIGKILL)  # die at the manifest write
    registry = Registry(store, base=base_model_spec_from_dir(model_dir))
    registry.register(lora, name="doomed")
    """
)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_registration_killed_half_way(kind, tmp_path, tiny_dir, registry_tiny_spec, request):
    moto = request.getfixturevalue("moto_s3") if kind == "s3" else None
    store = make_store(kind, tmp_path, moto)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(small_lora_bytes(registry_tiny_spec))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, store.uri, str(tiny_dir), str(lora), moto.endpoint if moto else ""],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    keys = store_keys(store)
    assert sorted(k.split("/")[0] for k in keys) == ["blobs", "staging"]  # weights only, no manifest
    reg = _registry(store, registry_tiny_spec, tmp_path)
    assert reg.list() == ([], None)
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("doomed")
    assert reg.gc().staging == [] and reg.gc().blobs == []  # too young to collect by default
    report = reg.gc(staging_older_than_s=0, blobs_older_than_s=0)
    assert sorted(report.staging + report.blobs) == sorted(keys)
    assert store_keys(store) == []
    assert reg.register(lora, name="doomed").version == 1


def test_deletion_reaches_other_replicas_within_the_ttl(adapter_store, registry_tiny_spec, tmp_path):
    now = [1000.0]
    admin = _registry(adapter_store, registry_tiny_spec, tmp_path, "admin")
    replica = _registry(
        adapter_store, registry_tiny_spec, tmp_path, "replica", manifest_ttl_s=5.0, clock=lambda: now[0]
    )
    admin.register(small_lora_bytes(registry_tiny_spec, seed=1), name="w")
    admin.register(small_lora_bytes(registry_tiny_spec, seed=2), name="w")
    assert replica.resolve("w").version == 2
    admin.delete("w@2")
    assert admin.resolve("w").version == 1  # at once where it was deleted
    now[0] += 4.999
    assert replica.resolve("w").version == 2  # the replica's listing is still fresh
    now[0] += 0.001
    assert replica.resolve("w").version == 1  # manifest_ttl_s after its last listing: gone
    with pytest.raises(AdapterNotFoundError):
        replica.load("w@2")


def test_gc_keeps_referenced_blobs(adapter_registry, registry_tiny_spec):
    keep = adapter_registry.register(small_lora_bytes(registry_tiny_spec, seed=1), name="keep")
    gone = adapter_registry.register(small_lora_bytes(registry_tiny_spec, seed=2), name="gone")
    adapter_registry.delete("gone")
    report = adapter_registry.gc(staging_older_than_s=0, blobs_older_than_s=0)
    assert report.blobs == [f"blobs/{gone.sha256}.safetensors"]
    assert adapter_registry.load("keep")[0] == keep


def test_base_model_mismatch_is_refused_at_load(adapter_store, registry_tiny_spec, tmp_path):
    from lora_registry import BaseModelSpec

    writer = _registry(adapter_store, registry_tiny_spec, tmp_path, "writer")
    writer.register(small_lora_bytes(registry_tiny_spec), name="w")
    other = BaseModelSpec(family="sd2", modules=registry_tiny_spec.modules)
    reader = _registry(adapter_store, other, tmp_path, "reader")
    assert reader.resolve("w").ref == "w@1"
    with pytest.raises(RegistryConflictError) as e:
        reader.load("w")
    assert (e.value.status, e.value.code) == (409, "base_model_mismatch")


def test_same_content_under_two_names_shares_one_blob(adapter_registry, registry_tiny_spec):
    data = small_lora_bytes(registry_tiny_spec)
    a = adapter_registry.register(data, name="a")
    b = adapter_registry.register(data, name="b")
    assert a.sha256 == b.sha256
    assert [k for k in store_keys(adapter_registry.store) if k.startswith("blobs/")] == [
        f"blobs/{a.sha256}.safetensors"
    ]
    assert adapter_registry.load("a")[1] is adapter_registry.load("b")[1]


def test_load_without_caches(adapter_store, registry_tiny_spec):
    reg = Registry(adapter_store, base=registry_tiny_spec)
    m = reg.register(small_lora_bytes(registry_tiny_spec), name="w")
    manifest, adapter = reg.load("w")
    assert manifest == m and sorted(adapter.modules) == list(m.target_modules)
    with pytest.raises(ValueError, match="no disk cache"):
        reg.fetch("w")


def test_open_registry_from_config(tmp_path, registry_tiny_spec):
    from pydantic import ValidationError

    from lora_registry import LocalStore, RegistryConfig, open_registry

    config = RegistryConfig(uri=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), disk_cache_bytes=1 << 20)
    reg = open_registry(config, base=registry_tiny_spec)
    assert isinstance(reg.store, LocalStore) and reg.cache.max_bytes == 1 << 20 and reg.manifest_ttl_s == 5.0
    assert reg.register(small_lora_bytes(registry_tiny_spec), name="w").ref == "w@1"
    for fields, field in [
        ({"max_rank": 0}, "max_rank"),
        ({"manifest_ttl_s": -1}, "manifest_ttl_s"),
        ({"disk_cache_bytes": 0}, "disk_cache_bytes"),
        ({"cache_size": 1}, "cache_size"),
        ({"uri": "/x", "s3_endpoint_url": "http://h"}, "s3_endpoint_url"),
    ]:
        with pytest.raises(ValidationError, match=field):
            RegistryConfig(**fields)
