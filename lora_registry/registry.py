"""The registry: register, list, resolve, delete, fetch and load adapters, over any ``Store``.

Registration (atomic; see ``layout`` for the keys)::

    validate + convert (nothing stored yet)  ->  weights to staging/<uuid>  ->  copy to blobs/<sha256>
      ->  manifest adapters/<name>/<v>.json by conditional create (409-free retry on the next version)
      ->  staging removed

A reader sees a version only once its manifest exists, and the manifest is the
last thing written, so an interrupted registration leaves nothing visible
(only an unreferenced staging object or blob, which ``gc()`` removes).
Versions are ``1 + the highest ever used``; numbers are never reused.

Deletion writes a tombstone next to the manifest: the version leaves listings
at once; other replicas learn it on their next listing, at most
``manifest_ttl_s`` later (``resolve`` is the authority, so callers resolve on
every request and drop what it no longer returns).

Nothing here lists the whole registry except ``gc()``: ``resolve`` / ``load`` /
``fetch`` / ``versions`` list one name's prefix (``adapters/<name>/``), and
``list`` reads one page of names from its cursor on (see ``listing``).

All methods are synchronous and thread-safe; call them from a worker thread in
async code.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import layout
from .base_model import BaseModelSpec
from .cache import DiskCache, ManifestCache, MemoryCache, sha256_file
from .canonical import CANONICAL_FORMAT, CanonicalAdapter, load_canonical
from .errors import (
    AdapterNotFoundError,
    RegistryConflictError,
    RegistryCorruptionError,
    RegistryUnavailableError,
)
from .listing import group_by_name, in_name_order, listing_start
from .manifest import BaseModelRef, Manifest, check_metadata, check_name, check_training, parse_ref, utc_now_iso
from .stores.base import ObjectInfo, ObjectNotFound, ProgressCallback, Store
from .targets import ServedTargets
from .validation import (
    DEFAULT_MAX_ADAPTER_BYTES,
    DEFAULT_MAX_RANK,
    DEFAULT_WEIGHT_LIMITS,
    PreparedAdapter,
    WeightLimits,
    check_size,
    prepare_adapter,
)

MAX_COMMIT_ATTEMPTS = 64
DEFAULT_LIST_SCAN_NAMES = 1000
# How far a listing reads past a name that may have a shorter name sorting before it (``ink`` for
# ``ink-wash``) before looking that name up on its own; see ``listing.in_name_order``.
LIST_READ_AHEAD_NAMES = 64
MANIFEST_FETCH_THREADS = 8  # parallel manifest GETs for one listing page on a cold cache
MAX_CACHED_PAGES = 256
Source = bytes | str | Path | BinaryIO


@dataclass(frozen=True)
class AdapterListing:
    """One adapter name: its latest live version's manifest and all its live versions."""

    name: str
    latest: Manifest
    versions: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "latest": self.latest.to_dict(), "versions": list(self.versions)}


@dataclass(frozen=True)
class GcReport:
    staging: list[str] = field(default_factory=list)  # staging keys removed
    blobs: list[str] = field(default_factory=list)  # unreferenced blob keys removed


# name -> {version: deleted}
_Index = dict[str, dict[int, bool]]
_Page = tuple[tuple[AdapterListing, ...], str | None]


class Registry:
    """Adapters in a store, validated against one base model, cached on disk and in memory.

    >>> registry = Registry(open_store("s3://adapters/prod"), base=spec,
    ...                     cache=DiskCache("/var/cache/lorafleet", 20 << 30),
    ...                     memory=MemoryCache(4 << 30))                    # doctest: +SKIP
    >>> registry.register("style.safetensors", name="watercolor").ref      # doctest: +SKIP
    'watercolor@1'
    >>> manifest, adapter = registry.load("watercolor")                    # doctest: +SKIP
    """

    def __init__(
        self,
        store: Store,
        base: BaseModelSpec | None = None,
        cache: DiskCache | None = None,
        memory: MemoryCache[CanonicalAdapter] | None = None,
        *,
        max_rank: int = DEFAULT_MAX_RANK,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        weight_limits: WeightLimits = DEFAULT_WEIGHT_LIMITS,
        manifest_ttl_s: float = 5.0,
        outage_backoff_s: float = 5.0,
        list_scan_names: int = DEFAULT_LIST_SCAN_NAMES,
        clock: Callable[[], float] = time.monotonic,
        targets: ServedTargets | None = None,
    ):
        """``targets``: the modules the serving side carries adapter slots on (``ServedTargets``); registration
        refuses an adapter with weights elsewhere (422 ``untargeted_modules``). ``None``: any module of
        ``base``."""
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if list_scan_names < 1:
            raise ValueError(f"list_scan_names must be >= 1, got {list_scan_names}")
        if max_adapter_bytes < 1:
            raise ValueError(f"max_adapter_bytes must be >= 1, got {max_adapter_bytes}")
        if manifest_ttl_s < 0 or outage_backoff_s < 0:
            raise ValueError("manifest_ttl_s and outage_backoff_s must be >= 0")
        self.store = store
        self.base = base
        self.targets = targets
        self.cache = cache
        self.memory = memory
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.weight_limits = weight_limits
        self.manifest_ttl_s = manifest_ttl_s
        self.outage_backoff_s = outage_backoff_s
        self.list_scan_names = list_scan_names
        self.manifests = ManifestCache(cache.root if cache is not None else None)
        self._clock = clock
        self._lock = threading.Lock()
        self._name_index: dict[str, tuple[float, dict[int, bool]]] = {}
        self._pages: OrderedDict[tuple[str | None, int, str | None], tuple[float, _Page]] = OrderedDict()
        self._generation = 0  # bumped by every write this node makes: pages computed before it are stale
        self._down_until = 0.0
        self._down_reason = ""

    # -- store access -------------------------------------------------------------------------

    def _check_outage(self) -> None:
        """Within ``outage_backoff_s`` of a store outage, fail fast instead of waiting on retries."""
        with self._lock:
            wait = self._down_until - self._clock()
            reason = self._down_reason
        if wait > 0:
            raise RegistryUnavailableError(
                f"store {self.store.uri} is unreachable ({reason}); next try in {wait:.1f}s", code="store_unreachable"
            )

    def _note_outage(self, e: RegistryUnavailableError) -> None:
        with self._lock:
            self._down_until = self._clock() + self.outage_backoff_s
            self._down_reason = e.message

    def _call(self, fn, *args):
        """Call the store, failing fast during an outage's backoff."""
        self._check_outage()
        try:
            return fn(*args)
        except RegistryUnavailableError as e:
            self._note_outage(e)
            raise

    def _list_store(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """``store.list`` as a lazy stream, with the same outage handling as ``_call``."""
        self._check_outage()
        try:
            if start_after is None:  # store wrappers written before start_after existed still list prefixes
                yield from self.store.list(prefix)
            else:
                yield from self.store.list(prefix, start_after=start_after)
        except RegistryUnavailableError as e:
            self._note_outage(e)
            raise

    def _scan(self, prefix: str) -> _Index:
        index: _Index = dict(group_by_name(self._call(lambda: list(self.store.list(prefix)))))
        for name, versions in index.items():
            self._forget_deleted(name, versions)
        return index

    def _forget_deleted(self, name: str, versions: dict[int, bool]) -> None:
        for version, deleted in versions.items():
            if deleted:
                self.manifests.discard(name, version)

    def _versions(self, name: str, fresh: bool = False) -> dict[int, bool]:
        """``{version: deleted}`` for one name, from one listing of ``adapters/<name>/`` (kept ``manifest_ttl_s``)."""
        now = self._clock()
        with self._lock:
            hit = self._name_index.get(name)
            if not fresh and hit is not None and now - hit[0] < self.manifest_ttl_s:
                return hit[1]
        versions = self._scan(layout.name_prefix(name)).get(name, {})
        with self._lock:
            self._name_index[name] = (now, versions)
        return versions

    def _invalidate(self, name: str) -> None:
        with self._lock:
            self._name_index.pop(name, None)
            self._pages.clear()
            self._generation += 1

    def _manifest(self, name: str, version: int) -> Manifest:
        cached = self.manifests.get(name, version)
        if cached is not None:
            return cached
        key = layout.manifest_key(name, version)
        try:
            data = self._call(self.store.get_bytes, key)
        except ObjectNotFound as e:
            raise AdapterNotFoundError(f"adapter {name}@{version} does not exist") from e
        try:
            manifest = Manifest.from_json(data)
        except ValueError as e:
            raise RegistryCorruptionError(f"manifest {key} is malformed: {e}", code="corrupt_manifest") from e
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryCorruptionError(f"manifest {key} names {manifest.ref}", code="corrupt_manifest")
        self.manifests.put(manifest)
        return manifest

    # -- reading ------------------------------------------------------------------------------

    def resolve(self, ref: str) -> Manifest:
        """The manifest ``ref`` names: ``"name"`` is its latest live version, ``"name@3"`` that version.

        Raises ``AdapterNotFoundError`` for unknown or deleted versions. If the
        store is unreachable, falls back to the manifests this node has seen
        (deletions made meanwhile are then not visible), else raises
        ``RegistryUnavailableError``.
        """
        name, version = parse_ref(ref)
        try:
            versions = self._versions(name)
        except RegistryUnavailableError as e:
            return self._resolve_offline(name, version, e)
        live = sorted(v for v, deleted in versions.items() if not deleted)
        if version is None:
            if not live:
                why = " (all its versions are deleted)" if versions else ""
                raise AdapterNotFoundError(f"no adapter named {name!r}{why}")
            version = live[-1]
        elif version not in live:
            why = "was deleted" if versions.get(version) else "does not exist"
            latest = f"; the latest is {name}@{live[-1]}" if live else ""
            raise AdapterNotFoundError(f"adapter {name}@{version} {why}{latest}")
        return self._manifest(name, version)

    def _resolve_offline(self, name: str, version: int | None, cause: RegistryUnavailableError) -> Manifest:
        if version is None:
            known = self.manifests.known_versions(name)
            version = known[-1] if known else None
        manifest = self.manifests.get(name, version) if version is not None else None
        if manifest is None:
            ref = name if version is None else f"{name}@{version}"
            raise RegistryUnavailableError(
                f"cannot resolve {ref!r}: the store is unreachable and this node has not seen it ({cause.message})",
                code=cause.code,
            ) from cause
        return manifest

    def list(
        self, *, tag: str | None = None, limit: int = 50, after: str | None = None
    ) -> tuple[list[AdapterListing], str | None]:
        """One ``AdapterListing`` per adapter name with a live version, sorted by name.

        Paged: pass the returned cursor (the last name listed) as ``after`` for
        the next page; it is ``None`` when no live name follows. ``tag`` keeps
        the names whose latest version carries that tag.

        Reads only the page: the store is listed from ``after`` on and stops
        once ``limit`` names (and one more live name, for the cursor) are found;
        manifests are read for the names listed (in parallel when not cached).
        A call examines at most ``limit + list_scan_names`` names, so a page
        that must pass many deleted names or names without ``tag`` comes back
        short, with the last name examined as its cursor: callers page until
        the cursor is ``None``, never until a short page. Pages are kept
        ``manifest_ttl_s``; this node's own writes drop them at once.

        >>> page, cursor = registry.list(limit=2)                   # doctest: +SKIP
        >>> [e.name for e in page], cursor
        (['ink', 'ink-wash'], 'ink-wash')
        >>> registry.list(limit=2, after=cursor)[0][0].name         # doctest: +SKIP
        'pastel'
        """
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in [1, 1000], got {limit}")
        if after is not None:
            check_name(after)
        key = (tag, limit, after)
        now = self._clock()
        with self._lock:
            hit = self._pages.get(key)
            if hit is not None and now - hit[0] < self.manifest_ttl_s:
                return list(hit[1][0]), hit[1][1]
            generation = self._generation
        page, seen = self._read_page(tag, limit, after)
        with self._lock:
            if generation == self._generation:  # no write of ours landed meanwhile
                self._pages[key] = (now, page)
                while len(self._pages) > MAX_CACHED_PAGES:
                    self._pages.popitem(last=False)
                for name, versions in seen.items():
                    if self._name_index.get(name, (now,))[0] <= now:  # never replace a newer listing of the name
                        self._name_index[name] = (now, versions)
        return list(page[0]), page[1]

    def _read_page(self, tag: str | None, limit: int, after: str | None) -> tuple[_Page, _Index]:
        """One page from the store, and every name examined on the way (``{version: deleted}``)."""
        names = in_name_order(
            group_by_name(self._list_store(layout.ADAPTERS_PREFIX, listing_start(after))),
            after=after,
            lookup=lambda name: self._versions(name) or None,
            read_ahead=LIST_READ_AHEAD_NAMES,
        )
        budget = limit + self.list_scan_names
        out: list[AdapterListing] = []
        seen: _Index = {}
        pending: deque[tuple[str, tuple[int, ...]]] = deque()  # live names, in order, manifests not yet read
        exhausted = False
        while True:
            need = limit - len(out)
            # Enough live names to fill the page, plus one to know whether the cursor is needed.
            while not exhausted and len(pending) <= need and len(seen) < budget:
                item = next(names, None)
                if item is None:
                    exhausted = True
                    break
                name, versions = item
                seen[name] = versions
                self._forget_deleted(name, versions)
                live = tuple(sorted(v for v, deleted in versions.items() if not deleted))
                if live:
                    pending.append((name, live))
            self._prefetch_manifests([(name, live[-1]) for name, live in list(pending)[:need]])
            while pending and len(out) < limit:
                name, live = pending.popleft()
                latest = self._manifest(name, live[-1])
                if tag is None or tag in latest.tags:
                    out.append(AdapterListing(name=name, latest=latest, versions=live))
            if len(out) == limit:
                if pending or (not exhausted and len(seen) >= budget):
                    return (tuple(out), out[-1].name), seen  # a live name follows (or may: out of budget)
                if exhausted:
                    return (tuple(out), None), seen
                continue  # read on: is there a live name after the page?
            if exhausted:
                return (tuple(out), None), seen
            if len(seen) >= budget:
                return (tuple(out), next(reversed(seen))), seen  # the last name examined

    def _prefetch_manifests(self, refs: list[tuple[str, int]]) -> None:
        """Read the manifests a page needs in parallel (one GET each on a cold cache)."""
        missing = [(name, version) for name, version in refs if self.manifests.get(name, version) is None]
        if len(missing) < 2:
            return
        with ThreadPoolExecutor(min(MANIFEST_FETCH_THREADS, len(missing)), "registry-manifests") as pool:
            for _ in pool.map(lambda ref: self._manifest(*ref), missing):
                pass

    def versions(self, name: str) -> list[Manifest]:
        """Every live version of ``name``, oldest first (empty if none)."""
        check_name(name)
        versions = self._versions(name)
        return [self._manifest(name, v) for v in sorted(v for v, deleted in versions.items() if not deleted)]

    def _check_base(self, manifest: Manifest) -> None:
        if self.base is not None and manifest.base_model.fingerprint != self.base.fingerprint:
            raise RegistryConflictError(
                f"{manifest.ref} was registered for base model {manifest.base_model.family} "
                f"(fingerprint {manifest.base_model.fingerprint}); this registry serves {self.base.family} "
                f"(fingerprint {self.base.fingerprint})",
                code="base_model_mismatch",
            )

    def _download_blob(self, manifest: Manifest, dest: Path, progress: ProgressCallback | None) -> None:
        try:
            self._call(self.store.download, layout.blob_key(manifest.sha256), dest, progress)
        except ObjectNotFound as e:
            raise RegistryCorruptionError(
                f"{manifest.ref}: blob {manifest.sha256} is missing from the store", code="missing_blob"
            ) from e

    def _fetch_path(self, manifest: Manifest, progress: ProgressCallback | None = None) -> Path:
        if self.cache is None:
            raise ValueError("this Registry has no disk cache; pass cache=DiskCache(...) to fetch adapters")
        try:
            return self.cache.get_or_fetch(manifest.sha256, lambda tmp: self._download_blob(manifest, tmp, progress))
        except RegistryCorruptionError as e:
            if e.code != "corrupt_blob":
                raise
            # Once more, in case the bytes were damaged in transit; a second mismatch is the store's.
            return self.cache.get_or_fetch(manifest.sha256, lambda tmp: self._download_blob(manifest, tmp, progress))

    def fetch(self, ref: str, progress: ProgressCallback | None = None) -> tuple[Manifest, Path]:
        """Resolve ``ref`` and return its canonical weights file in the disk cache (sha256-verified)."""
        manifest = self.resolve(ref)
        self._check_base(manifest)
        return manifest, self._fetch_path(manifest, progress)

    def _load_blob(self, manifest: Manifest) -> CanonicalAdapter:
        if self.cache is not None:
            data = self.cache.read(manifest.sha256)  # verified
            if data is None:
                data = self._fetch_path(manifest).read_bytes()  # verified by the fetch
        else:
            data = self._call(self.store.get_bytes, layout.blob_key(manifest.sha256))
            if hashlib.sha256(data).hexdigest() != manifest.sha256:
                raise RegistryCorruptionError(f"{manifest.ref}: blob does not match its sha256", code="corrupt_blob")
        return load_canonical(data)

    def load(self, ref: str) -> tuple[Manifest, CanonicalAdapter]:
        """Resolve ``ref`` and return its loaded canonical adapter (memory cache, then disk, then store).

        Concurrent loads of one adapter in this process run once.
        """
        manifest = self.resolve(ref)
        self._check_base(manifest)
        if self.memory is None:
            return manifest, self._load_blob(manifest)
        return manifest, self.memory.get_or_load(manifest.sha256, lambda: self._load_blob(manifest))

    def pull(self, ref: str, dest: str | Path, progress: ProgressCallback | None = None) -> Manifest:
        """Download ``ref``'s canonical weights to ``dest`` (verified, then renamed into place)."""
        manifest = self.resolve(ref)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            self._download_blob(manifest, tmp, progress)
            digest = sha256_file(tmp)
            if digest != manifest.sha256:
                raise RegistryCorruptionError(
                    f"{manifest.ref}: downloaded blob hashes to {digest}, expected {manifest.sha256}",
                    code="corrupt_blob",
                )
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return manifest

    # -- writing ------------------------------------------------------------------------------

    def _prepare(self, source: Source, adapter_config: dict | None, source_format: str | None) -> PreparedAdapter:
        if self.base is None:
            raise ValueError("this Registry was opened without a base model spec; pass base= to register adapters")
        kwargs = dict(
            max_rank=self.max_rank,
            max_bytes=self.max_adapter_bytes,
            weight_limits=self.weight_limits,
            adapter_config=adapter_config,
            source_format=source_format,
            targets=self.targets,
        )
        if isinstance(source, (str, Path)):
            path = Path(source)
            check_size(path.stat().st_size, self.max_adapter_bytes)  # before opening it
            with open(path, "rb") as f:
                return prepare_adapter(f, self.base, **kwargs)
        return prepare_adapter(source, self.base, **kwargs)

    def register(
        self,
        source: Source,
        *,
        name: str,
        description: str = "",
        trigger_words: Sequence[str] = (),
        tags: Sequence[str] = (),
        training: dict | None = None,
        adapter_config: dict | None = None,
        source_format: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> Manifest:
        """Validate, convert and store a LoRA file as the next version of ``name``; returns its manifest.

        ``source``: the file's bytes, a path, or a seekable binary file.
        ``adapter_config``: the PEFT ``adapter_config.json`` contents, if the
        upload came with one (it sets alpha). ``source_format``: ``"diffusers"``
        or ``"kohya"`` to insist on one; detected from the keys otherwise.
        ``progress(n_bytes)`` is called as the weights upload.

        Raises ``InvalidAdapterError`` (422) or ``AdapterTooLargeError`` (413)
        with nothing stored, ``RegistryUnavailableError`` (503).
        """
        check_name(name)
        trigger_words, tags = list(trigger_words), list(tags)
        check_metadata(description, trigger_words, tags)
        check_training(training)
        prepared = self._prepare(source, adapter_config, source_format)
        staging = layout.staging_key(uuid.uuid4().hex)
        self._call(self.store.put_bytes, staging, prepared.blob, progress)
        try:
            self._call(self.store.copy, staging, layout.blob_key(prepared.sha256))
            manifest = self._commit(name, prepared, description, trigger_words, tags, training)
        finally:
            try:
                self.store.delete(staging)
            except RegistryUnavailableError:
                pass  # an orphaned staging object is invisible; gc() removes it
        self.manifests.put(manifest)
        self._invalidate(name)
        if self.cache is not None:
            try:
                self.cache.put(prepared.sha256, prepared.blob)
            except OSError:
                pass  # the cache is an optimisation; the registration itself succeeded
        return manifest

    def _commit(
        self,
        name: str,
        prepared: PreparedAdapter,
        description: str,
        trigger_words: list[str],
        tags: list[str],
        training: dict | None = None,
    ) -> Manifest:
        """Write the manifest by conditional create, taking the next free version number."""
        adapter = prepared.adapter
        version = max(self._versions(name, fresh=True), default=0) + 1
        for _ in range(MAX_COMMIT_ATTEMPTS):
            manifest = Manifest(
                name=name,
                version=version,
                base_model=BaseModelRef(family=self.base.family, fingerprint=self.base.fingerprint),
                format=CANONICAL_FORMAT,
                source_format=prepared.source_format,
                rank=adapter.rank,
                alpha=adapter.alpha,
                target_modules=tuple(adapter.modules),
                has_text_encoder=adapter.has_text_encoder,
                dtype=str(adapter.dtype).removeprefix("torch."),
                sha256=prepared.sha256,
                size_bytes=len(prepared.blob),
                created_at=utc_now_iso(),
                description=description,
                training=training,
                trigger_words=tuple(trigger_words),
                tags=tuple(tags),
            )
            data = manifest.to_json()
            key = layout.manifest_key(name, version)
            if self._call(self.store.put_if_absent, key, data):
                return manifest
            # Lost the race for this version, unless a retried request of ours had already landed.
            try:
                if self._call(self.store.get_bytes, key) == data:
                    return manifest
            except ObjectNotFound:
                pass
            version += 1
        raise RegistryConflictError(
            f"could not take a version number for {name!r} after {MAX_COMMIT_ATTEMPTS} attempts", code="version_race"
        )

    def delete(self, ref: str) -> list[Manifest]:
        """Delete one version (``"name@3"``) or every live version (``"name"``); returns what was deleted.

        The version leaves this node's listings at once and every replica's
        within ``manifest_ttl_s``. The weights stay in the store until ``gc()``.
        """
        name, version = parse_ref(ref)
        versions = self._versions(name, fresh=True)
        live = sorted(v for v, deleted in versions.items() if not deleted)
        if version is not None and version not in live:
            why = "was already deleted" if versions.get(version) else "does not exist"
            raise AdapterNotFoundError(f"adapter {name}@{version} {why}")
        if not live:
            raise AdapterNotFoundError(f"no adapter named {name!r}")
        deleted = []
        for v in [version] if version is not None else live:
            manifest = self._manifest(name, v)
            tombstone = json.dumps({"deleted_at": utc_now_iso()}).encode()
            self._call(self.store.put_bytes, layout.tombstone_key(name, v), tombstone)
            self.manifests.discard(name, v)
            deleted.append(manifest)
        self._invalidate(name)
        return deleted

    def gc(self, *, staging_older_than_s: float = 3600.0, blobs_older_than_s: float = 86400.0) -> GcReport:
        """Remove staging objects and unreferenced blobs older than the given ages.

        Run it from one place (a cron job or the CLI). The ages protect
        registrations in flight: their staging object and freshly copied blob
        are younger than any sensible threshold.
        """
        now = time.time()
        report = GcReport()
        for obj in self._call(lambda: list(self.store.list(layout.STAGING_PREFIX))):
            if now - obj.modified >= staging_older_than_s:
                self._call(self.store.delete, obj.key)
                report.staging.append(obj.key)
        index = self._scan(layout.ADAPTERS_PREFIX)
        referenced = {
            self._manifest(name, v).sha256 for name, vs in index.items() for v, deleted in vs.items() if not deleted
        }
        for obj in self._call(lambda: list(self.store.list(layout.BLOBS_PREFIX))):
            sha = layout.sha_from_blob_key(obj.key)
            if sha is not None and sha not in referenced and now - obj.modified >= blobs_older_than_s:
                self._call(self.store.delete, obj.key)
                report.blobs.append(obj.key)
        with self._lock:
            self._pages.clear()
            self._generation += 1
        return report
