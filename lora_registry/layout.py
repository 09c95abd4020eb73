"""Where things live in a store (the same layout on S3 and in a local directory).

::

    staging/<uuid>.safetensors          weights being uploaded; never referenced; removed by gc()
    blobs/<sha256>.safetensors          canonical weights, content-addressed, immutable
    adapters/<name>/<version:08d>.json  the manifest, written last, with a conditional create
    adapters/<name>/<version:08d>.deleted   tombstone: the version is deleted

Manifests are never overwritten or removed, so a version number is never
reused: ``name@3`` means the same bytes on every replica, forever, and caches
can keep manifests without invalidation. Deletion only adds a tombstone.
"""

from __future__ import annotations

import re

from .manifest import NAME_PATTERN

STAGING_PREFIX = "staging/"
BLOBS_PREFIX = "blobs/"
ADAPTERS_PREFIX = "adapters/"

_ENTRY_RE = re.compile(rf"^adapters/({NAME_PATTERN[1:-1]})/(\d{{8}})\.(json|deleted)$")


def staging_key(upload_id: str) -> str:
    return f"{STAGING_PREFIX}{upload_id}.safetensors"


def blob_key(sha256: str) -> str:
    return f"{BLOBS_PREFIX}{sha256}.safetensors"


def manifest_key(name: str, version: int) -> str:
    return f"{ADAPTERS_PREFIX}{name}/{version:08d}.json"


def tombstone_key(name: str, version: int) -> str:
    return f"{ADAPTERS_PREFIX}{name}/{version:08d}.deleted"


def name_prefix(name: str) -> str:
    return f"{ADAPTERS_PREFIX}{name}/"


def parse_entry_key(key: str) -> tuple[str, int, str] | None:
    """``"adapters/foo/00000003.json"`` -> ``("foo", 3, "json")``; ``None`` for any other key."""
    m = _ENTRY_RE.match(key)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), m.group(3)


def sha_from_blob_key(key: str) -> str | None:
    if key.startswith(BLOBS_PREFIX) and key.endswith(".safetensors"):
        return key[len(BLOBS_PREFIX) : -len(".safetensors")]
    return None
