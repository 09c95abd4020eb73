"""Caches below the registry: adapter blobs on local disk, loaded adapters in host memory, seen manifests.

``DiskCache``: ``<root>/blobs/<sha256>``, content-addressed and verified by
hash on every read (a corrupt file is deleted and fetched again). Files appear
by atomic rename from a temporary file in the same directory; a per-sha file
lock makes one process (and one thread) fetch a blob while the others wait for
it. Least recently used files are evicted when the total passes ``max_bytes``;
a blob being fetched is never evicted, and neither is the one just returned.

``MemoryCache``: a byte-capped LRU of loaded values (``CanonicalAdapter``),
keyed by sha256, with single-flight loading and pinning of values in use.

``ManifestCache``: manifests this node has seen, kept in memory and under
``<root>/manifests`` so that versions already on disk keep resolving while the
store is unreachable.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from filelock import FileLock, Timeout

from .errors import RegistryCorruptionError, RegistryUnavailableError
from .manifest import Manifest

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    sha256: str
    size: int
    last_used_ns: int


class DiskCache:
    """Content-addressed blob cache on local disk, LRU by bytes, safe across processes on one node."""

    def __init__(self, root: str | Path, max_bytes: int, *, lock_timeout_s: float = 300.0):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.lock_timeout_s = lock_timeout_s
        self.blobs = self.root / "blobs"
        self.locks = self.root / "locks"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}
        self._last_touch_ns = 0

    def path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.blobs / sha256

    def _touch(self, path: Path) -> None:
        with self._mutex:  # strictly increasing within the process, so LRU order is exact
            now = max(time.time_ns(), self._last_touch_ns + 1)
            self._last_touch_ns = now
        os.utime(path, ns=(now, now))

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> Path | None:
        """The verified blob's path (now most recently used), or ``None`` if absent or corrupt (then deleted)."""
        path = self.path(sha256)
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            return None
        if digest != sha256:
            self.discard(sha256)
            return None
        self._touch(path)
        return path

    def read(self, sha256: str) -> bytes | None:
        """The verified blob's bytes (one read: hashed in memory), or ``None`` if absent or corrupt."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            self.discard(sha256)
            return None
        self._touch(path)
        return data

    @contextmanager
    def _single_flight(self, sha256: str) -> Iterator[None]:
        with self._mutex:
            thread_lock = self._thread_locks.setdefault(sha256, threading.Lock())
        with thread_lock:
            lock = FileLock(str(self.locks / f"{sha256}.lock"))
            try:
                lock.acquire(timeout=self.lock_timeout_s)
            except Timeout as e:
                raise RegistryUnavailableError(
                    f"waited {self.lock_timeout_s}s for another process fetching blob {sha256}", code="cache_lock"
                ) from e
            try:
                yield
            finally:
                lock.release()

    def get_or_fetch(self, sha256: str, fetch: Callable[[Path], None]) -> Path:
        """The blob's path, calling ``fetch(tmp_path)`` to download it if no valid copy is cached.

        Concurrent callers for one sha (threads or processes) fetch once; the
        others wait and then read the result. A download whose hash is wrong
        raises ``RegistryCorruptionError`` and leaves nothing in the cache.
        """
        path = self.get(sha256)
        if path is not None:
            return path
        with self._single_flight(sha256):
            path = self.get(sha256)  # second check: someone fetched it while we waited
            if path is not None:
                return path
            path = self.path(sha256)
            tmp = self.blobs / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                fetch(tmp)
                digest = sha256_file(tmp)
                if digest != sha256:
                    raise RegistryCorruptionError(
                        f"downloaded blob hashes to {digest}, but its manifest says {sha256}", code="corrupt_blob"
                    )
                os.replace(tmp, path)
                self._touch(path)
            finally:
                tmp.unlink(missing_ok=True)
        self.evict(keep={sha256})
        return path

    def put(self, sha256: str, data: bytes) -> Path:
        """Insert bytes we already hold (e.g. right after registering them)."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"data does not hash to {sha256}")
        path = self.path(sha256)
        with self._single_flight(sha256):
            tmp = self.blobs / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self._touch(path)
            finally:
                tmp.unlink(missing_ok=True)
        self.evict(keep={sha256})
        return path

    def discard(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def entries(self) -> list[CacheEntry]:
        """Cached blobs, least recently used first."""
        out = []
        for path in self.blobs.iterdir():
            if path.name.startswith(_TMP_PREFIX) or not _SHA_RE.match(path.name):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append(CacheEntry(sha256=path.name, size=st.st_size, last_used_ns=st.st_mtime_ns))
        return sorted(out, key=lambda e: (e.last_used_ns, e.sha256))

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def evict(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete least recently used blobs until the total is within ``max_bytes``; returns their shas.

        Blobs in ``keep`` and blobs whose fetch lock is held (being fetched) are
        skipped; if only those are left, the cache stays over its cap.
        """
        evicted = []
        with FileLock(str(self.root / "evict.lock"), timeout=self.lock_timeout_s):
            entries = self.entries()
            total = sum(e.size for e in entries)
            for entry in entries:
                if total <= self.max_bytes:
                    break
                if entry.sha256 in keep:
                    continue
                lock = FileLock(str(self.locks / f"{entry.sha256}.lock"))
                try:
                    lock.acquire(blocking=False)
                except Timeout:
                    continue  # being fetched right now
                try:
                    self.discard(entry.sha256)
                finally:
                    lock.release()
                total -= entry.size
                evicted.append(entry.sha256)
        return evicted


V = TypeVar("V")


class _Flight:
    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error: BaseException | None = None


class MemoryCache(Generic[V]):
    """A byte-capped LRU of loaded values with single-flight loads and pinning.

    ``size_of(value)`` gives a value's bytes (default: ``value.nbytes``). A
    value larger than the whole cap is returned but not kept. Pinned values are
    never evicted (the cache may then exceed its cap until they are unpinned).
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int] | None = None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of or (lambda v: v.nbytes)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, tuple[V, int]] = collections.OrderedDict()  # LRU first
        self._pins: collections.Counter[str] = collections.Counter()
        self._flights: dict[str, _Flight] = {}
        self.loads = 0  # how many times a loader ran (for tests and metrics)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> V | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def get_or_load(self, key: str, load: Callable[[], V]) -> V:
        """The cached value, or ``load()``'s result; concurrent callers for one key share one ``load()``."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            value = load()
            self.loads += 1
        except BaseException as e:
            flight.error = e
            with self._lock:
                del self._flights[key]
            flight.done.set()
            raise
        flight.value = value
        with self._lock:
            del self._flights[key]
            size = self._size_of(value)
            if size <= self.max_bytes:
                self._entries[key] = (value, size)
                self._evict_locked(keep=key)
        flight.done.set()
        return value

    def _evict_locked(self, keep: str) -> None:
        total = sum(size for _, size in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key == keep or self._pins[key] > 0:
                continue
            total -= self._entries.pop(key)[1]

    def pin(self, key: str) -> None:
        with self._lock:
            if key not in self._entries:
                raise KeyError(f"cannot pin {key!r}: not cached")
            self._pins[key] += 1

    def unpin(self, key: str) -> None:
        with self._lock:
            if self._pins[key] <= 0:
                raise KeyError(f"{key!r} is not pinned")
            self._pins[key] -= 1
            if self._pins[key] == 0:
                del self._pins[key]
                self._evict_locked(keep="")

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            for key in [k for k in self._entries if self._pins[k] == 0]:
                del self._entries[key]


class ManifestCache:
    """Manifests seen by this node: in memory, and as files under ``<root>/manifests`` if ``root`` is given.

    Manifests are immutable, so nothing here expires; deletions are learned
    from the store's listing, and ``discard`` forgets a deleted version.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() / "manifests" if root is not None else None
        self._lock = threading.Lock()
        self._mem: dict[tuple[str, int], Manifest] = {}

    def _file(self, name: str, version: int) -> Path:
        assert self.root is not None
        return self.root / name / f"{version:08d}.json"

    def get(self, name: str, version: int) -> Manifest | None:
        with self._lock:
            m = self._mem.get((name, version))
        if m is not None or self.root is None:
            return m
        try:
            m = Manifest.from_json(self._file(name, version).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        with self._lock:
            self._mem[(name, version)] = m
        return m

    def put(self, manifest: Manifest) -> None:
        with self._lock:
            self._mem[(manifest.name, manifest.version)] = manifest
        if self.root is not None:
            path = self._file(manifest.name, manifest.version)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            tmp.write_bytes(manifest.to_json())
            os.replace(tmp, path)

    def discard(self, name: str, version: int) -> None:
        with self._lock:
            self._mem.pop((name, version), None)
        if self.root is not None:
            self._file(name, version).unlink(missing_ok=True)

    def known_versions(self, name: str) -> list[int]:
        """Versions of ``name`` this node has seen (memory and disk), ascending."""
        with self._lock:
            versions = {v for (n, v) in self._mem if n == name}
        if self.root is not None and (self.root / name).is_dir():
            for path in (self.root / name).iterdir():
                stem = path.name.removesuffix(".json")
                if path.name.endswith(".json") and stem.isdigit():
                    versions.add(int(stem))
        return sorted(versions)
