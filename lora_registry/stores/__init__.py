"""Stores behind one small interface, chosen by URI.

>>> open_store("s3://adapters/prod")                       # doctest: +SKIP
>>> open_store("/var/lib/lorafleet/registry")              # doctest: +SKIP
>>> open_store("s3://b/p", endpoint_url="http://127.0.0.1:9000")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from .base import ObjectInfo, ObjectNotFound, ProgressCallback, Store
from .local import LocalStore
from .s3 import S3Options, S3Store


def open_store(uri: str, **s3_options) -> Store:
    """``s3://bucket/prefix`` -> ``S3Store`` (``s3_options``: ``S3Options`` fields or ``client=``);
    ``file:///path``, ``/path`` or ``~/path`` -> ``LocalStore``."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"registry URI must be a non-empty string, got {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        client = s3_options.pop("client", None)
        return S3Store(bucket, prefix, options=S3Options(**s3_options), client=client)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"registry URI {uri!r}: unsupported scheme; use s3://bucket/prefix or a local directory")
    if s3_options:
        raise ValueError(f"S3 options {sorted(s3_options)} given for a local registry URI {uri!r}")
    return LocalStore(Path(uri.removeprefix("file://")).expanduser())


__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ProgressCallback",
    "S3Options",
    "S3Store",
    "Store",
    "open_store",
]
