"""Caches: exact state after every step; concurrency controlled with events, never sleeps."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import pytest

import lora_registry.cache as cache_module
from lora_registry.cache import DiskCache, ManifestCache, MemoryCache
from lora_registry.errors import RegistryCorruptionError
from lora_registry.manifest import BaseModelRef, Manifest

from registry_helpers import spy_on_flight_waits

pytest_plugins = ["registry_helpers"]


def blob(tag: str, size: int = 100) -> tuple[str, bytes]:
    data = (tag.encode() * size)[:size]
    return hashlib.sha256(data).hexdigest(), data


A, B, C, D = (blob(t) for t in "abcd")


def writer(data: bytes, calls: list):
    def fetch(tmp):
        calls.append(tmp)
        tmp.write_bytes(data)

    return fetch


def shas(cache: DiskCache) -> list[str]:
    return [e.sha256 for e in cache.entries()]


# -- DiskCache -----------------------------------------------------------------------------------


def test_disk_cache_fetches_once_then_hits(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    calls = []
    path = cache.get_or_fetch(A[0], writer(A[1], calls))
    assert path == tmp_path / "blobs" / A[0] and path.read_bytes() == A[1]
    assert cache.get_or_fetch(A[0], writer(A[1], calls)) == path
    assert len(calls) == 1
    assert shas(cache) == [A[0]] and cache.total_bytes == 100
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [A[0]]  # no temporary files left


def test_disk_cache_lru_eviction_by_bytes(tmp_path):
    cache = DiskCache(tmp_path, 250)
    cache.put(*A)
    cache.put(*B)
    assert shas(cache) == [A[0], B[0]]
    cache.put(*C)  # 300 > 250: the least recently used (A) goes
    assert shas(cache) == [B[0], C[0]]
    assert cache.read(B[0]) == B[1]  # B is now the most recently used
    assert shas(cache) == [C[0], B[0]]
    cache.get_or_fetch(D[0], writer(D[1], []))
    assert shas(cache) == [B[0], D[0]]
    assert cache.total_bytes == 200


def test_disk_cache_keeps_the_newest_blob_even_over_the_cap(tmp_path):
    cache = DiskCache(tmp_path, 50)
    cache.put(*A)
    assert shas(cache) == [A[0]]
    cache.put(*B)
    assert shas(cache) == [B[0]]


def test_disk_cache_detects_corruption_and_refetches(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    path = cache.put(*A)
    path.write_bytes(b"x" * 100)  # bit rot, a partial copy, a curious operator ...
    assert cache.get(A[0]) is None
    assert not path.exists()
    path.write_bytes(b"y" * 100)
    assert cache.read(A[0]) is None and not path.exists()
    calls = []
    assert cache.get_or_fetch(A[0], writer(A[1], calls)).read_bytes() == A[1]
    assert len(calls) == 1


def test_disk_cache_refuses_a_download_with_the_wrong_hash(tmp_path):
    cache = DiskCache(tmp_path, 1000)
    with pytest.raises(RegistryCorruptionError) as e:
        cache.get_or_fetch(A[0], writer(B[1], []))
    assert e.value.code == "corrupt_blob" and e.value.status == 502
    assert shas(cache) == []
    assert list((tmp_path / "blobs").iterdir()) == []


def test_disk_cache_failed_fetch_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path, 1000)

    def fetch(tmp):
        tmp.write_bytes(b"half")
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        cache.get_or_fetch(A[0], fetch)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_disk_cache_single_fetch_across_instances(tmp_path, monkeypatch):
    """Two DiskCache objects on one directory (as two processes would be): the file lock makes one fetch."""
    second_waiting = threading.Event()

    class SpyLock(cache_module.FileLock):
        def acquire(self, *args, **kwargs):
            if threading.current_thread().name == "second" and self.lock_file.endswith(f"{A[0]}.lock"):
                second_waiting.set()
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(cache_module, "FileLock", SpyLock)
    first, second = DiskCache(tmp_path, 1000), DiskCache(tmp_path, 1000)
    entered, release = threading.Event(), threading.Event()
    calls, results = [], {}

    def slow_fetch(tmp):
        calls.append(threading.current_thread().name)
        entered.set()
        assert release.wait(10)
        tmp.write_bytes(A[1])

    def run(cache, name):
        results[name] = cache.get_or_fetch(A[0], slow_fetch)

    t1 = threading.Thread(target=run, args=(first, "first"), name="first")
    t1.start()
    assert entered.wait(10)
    t2 = threading.Thread(target=run, args=(second, "second"), name="second")
    t2.start()
    assert second_waiting.wait(10)  # the second is at the lock while the first is still downloading
    release.set()
    t1.join(10)
    t2.join(10)
    assert calls == ["first"]
    assert results["first"] == results["second"] == tmp_path / "blobs" / A[0]


def test_disk_cache_does_not_evict_a_blob_being_fetched(tmp_path):
    cache = DiskCache(tmp_path, 150)
    cache.put(*A)
    entered, release = threading.Event(), threading.Event()

    def slow_fetch(tmp):
        entered.set()
        assert release.wait(10)
        tmp.write_bytes(B[1])

    t = threading.Thread(target=cache.get_or_fetch, args=(B[0], slow_fetch))
    t.start()
    assert entered.wait(10)
    # Another process holds A's fetch lock (e.g. re-verifying it): eviction must skip A.
    from filelock import FileLock

    with FileLock(str(tmp_path / "locks" / f"{A[0]}.lock")):
        release.set()
        t.join(10)
        assert sorted(shas(cache)) == sorted([A[0], B[0]])  # over the cap, but A was in use
    assert cache.evict() == [A[0]]
    assert shas(cache) == [B[0]]


# -- MemoryCache ---------------------------------------------------------------------------------


@dataclass
class Fake:
    """A "model" whose identity is its id, with a size in bytes."""

    id: str
    nbytes: int


def test_memory_cache_lru_by_bytes():
    cache = MemoryCache(250)
    for key in ("a", "b"):
        cache.get_or_load(key, lambda key=key: Fake(key, 100))
    assert cache.keys() == ["a", "b"] and cache.nbytes == 200
    assert cache.get("a") == Fake("a", 100)
    assert cache.keys() == ["b", "a"]
    cache.get_or_load("c", lambda: Fake("c", 100))
    assert cache.keys() == ["a", "c"] and cache.nbytes == 200
    assert cache.loads == 3


def test_memory_cache_pins_block_eviction_until_unpinned():
    cache = MemoryCache(250)
    cache.get_or_load("a", lambda: Fake("a", 100))
    cache.pin("a")
    cache.get_or_load("b", lambda: Fake("b", 100))
    cache.get_or_load("c", lambda: Fake("c", 100))
    assert cache.keys() == ["a", "c"]  # b went, although a is older: a is pinned
    cache.pin("c")
    cache.get_or_load("d", lambda: Fake("d", 100))
    assert cache.keys() == ["a", "c", "d"] and cache.nbytes == 300  # over the cap while pinned
    cache.unpin("a")
    assert cache.keys() == ["c", "d"]
    with pytest.raises(KeyError):
        cache.unpin("a")
    with pytest.raises(KeyError):
        cache.pin("zzz")


def test_memory_cache_does_not_keep_values_larger_than_the_cap():
    cache = MemoryCache(250)
    cache.get_or_load("a", lambda: Fake("a", 100))
    assert cache.get_or_load("huge", lambda: Fake("huge", 300)) == Fake("huge", 300)
    assert cache.keys() == ["a"]


def test_memory_cache_single_flight(monkeypatch):
    follower_waiting = threading.Event()

    spy_on_flight_waits(monkeypatch, follower_waiting.set)
    cache = MemoryCache(1000)
    entered, release = threading.Event(), threading.Event()
    calls, results = [], []

    def load():
        calls.append(1)
        entered.set()
        assert release.wait(10)
        return Fake("a", 10)

    t1 = threading.Thread(target=lambda: results.append(cache.get_or_load("a", load)))
    t1.start()
    assert entered.wait(10)
    t2 = threading.Thread(target=lambda: results.append(cache.get_or_load("a", load)))
    t2.start()
    assert follower_waiting.wait(10)  # the second caller waits on the first one's load
    release.set()
    t1.join(10)
    t2.join(10)
    assert calls == [1] and cache.loads == 1
    assert results == [Fake("a", 10), Fake("a", 10)] and results[0] is results[1]


def test_memory_cache_load_error_reaches_every_waiter_and_is_not_cached():
    cache = MemoryCache(1000)

    def boom():
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.get_or_load("a", boom)
    assert cache.keys() == [] and cache._flights == {}
    assert cache.get_or_load("a", lambda: Fake("a", 1)) == Fake("a", 1)


# -- ManifestCache -------------------------------------------------------------------------------


def _manifest(name: str, version: int) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        base_model=BaseModelRef("sd1", "f" * 32),
        format="lorafleet.lora/1",
        source_format="kohya",
        rank=4,
        alpha=4.0,
        target_modules=("unet.conv_in",),
        has_text_encoder=False,
        dtype="float32",
        sha256="a" * 64,
        size_bytes=10,
        created_at="2026-01-01T00:00:00.000000Z",
    )


def test_manifest_cache_persists_on_disk(tmp_path):
    cache = ManifestCache(tmp_path)
    cache.put(_manifest("w", 1))
    cache.put(_manifest("w", 3))
    other = ManifestCache(tmp_path)  # another process, or after a restart
    assert other.known_versions("w") == [1, 3]
    assert other.get("w", 3) == _manifest("w", 3)
    other.discard("w", 3)
    assert ManifestCache(tmp_path).known_versions("w") == [1]
    assert ManifestCache(None).get("w", 1) is None


def test_manifest_json_round_trip():
    m = _manifest("w", 2)
    assert Manifest.from_json(m.to_json()) == m
    for field, value, message in [
        ("version", "2", "'version'"),
        ("schema", "other/9", "schema"),
        ("name", "Bad", "'name'"),
    ]:
        d = m.to_dict()
        d[field] = value
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict(d)
    d = m.to_dict()
    del d["sha256"]
    with pytest.raises(ValueError, match="'sha256'"):
        Manifest.from_dict(d)


def test_cache_dirs_are_created(tmp_path):
    DiskCache(tmp_path / "deep" / "cache", 10)
    assert sorted(os.listdir(tmp_path / "deep" / "cache")) == ["blobs", "locks"]
