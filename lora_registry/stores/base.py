"""The small interface every store implements (S3 and a local directory).

Keys are ``/``-separated relative paths (see ``layout``). Implementations
raise ``ObjectNotFound`` for a missing key and ``RegistryUnavailableError``
when the backing service cannot be reached after retries; nothing else is
part of the contract.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Called with the number of bytes moved since the last call (tqdm.update fits).
ProgressCallback = Callable[[int], None]

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}")
    return key


class Store(ABC):
    """Object storage with one conditional write (``put_if_absent``), enough for atomic registration."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, progress: ProgressCallback | None = None) -> None:
        """Create or replace ``key``; readers see the old object or the whole new one, never a part."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist, atomically; ``False`` if it already existed."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def download(self, key: str, dest: Path, progress: ProgressCallback | None = None) -> None:
        """Write the object to the local file ``dest`` (created or truncated)."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Server-side copy; ``dst`` appears whole or not at all."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is absent."""

    @abstractmethod
    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (and is greater than ``start_after``), in key order.

        Lazy: objects are read from the backing service as the caller consumes
        them, so a caller that stops early reads little more than it used (S3:
        ``ListObjectsV2`` requests of 128 keys, then more per request; local: one
        directory at a time). Order is by key, character by character, so
        ``adapters/a-b/...`` comes before ``adapters/a/...`` (``-`` and ``.``
        sort before ``/``).

        >>> [o.key for o in store.list("adapters/", start_after="adapters/ink")]   # doctest: +SKIP
        ['adapters/ink/00000001.json', 'adapters/pastel/00000001.json']
        """

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...
