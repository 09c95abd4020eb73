"""Tenant API keys, kept in the registry's store beside the adapters: ``keys/<sha256 of the key>.json``.

A key is random (``secrets.token_urlsafe``), shown once when it is created and never stored: the store holds
its SHA-256 only, with the tenant's name, its fair-share weight and its quota overrides. Looking a key up is
one read of the object its hash names; revoking keeps the record (``revoked: true``) so that a revoked key
is told apart from an unknown one.

>>> keys = KeyStore(LocalStore("/tmp/reg"))                       # doctest: +SKIP
>>> raw, record = keys.create("alice", weight=2.0, quota={"rate_per_s": 5})   # doctest: +SKIP
>>> keys.lookup(raw).name                                          # doctest: +SKIP
'alice'
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace

from .stores.base import ObjectNotFound, Store

PREFIX = "keys/"
KEY_PREFIX = "lf_"  # every key starts so: a stray key in a log or a diff is recognisable
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
QUOTA_FIELDS = ("rate_per_s", "burst", "max_images_in_flight")


class KeyStoreError(ValueError):
    """A key operation that cannot be done; the message says why, ``code`` what kind: ``invalid_value`` (a bad
    name, weight or quota), ``key_exists`` (a live key has that name), ``key_not_found``."""

    def __init__(self, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.code = code


def key_hash(raw: str) -> str:
    """The SHA-256 (hex) a key is stored and looked up by."""
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One tenant key as stored (never the key itself)."""

    name: str  # the tenant's name: unique among keys, shown in metrics and logs
    sha256: str  # of the key
    weight: float = 1.0  # fair-share weight
    # overrides of auth.quotas / auth.default_quota: rate_per_s, burst, max_images_in_flight
    quota: dict = field(default_factory=dict)
    created: float = 0.0  # seconds since the epoch
    revoked: bool = False

    @property
    def id(self) -> str:
        """A short public id (the hash's first 12 hex digits)."""
        return self.sha256[:12]

    def public(self) -> dict:
        """What listings show: everything but the full hash."""
        return {
            "id": self.id,
            "name": self.name,
            "weight": self.weight,
            "quota": dict(self.quota),
            "created": self.created,
            "revoked": self.revoked,
        }


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise KeyStoreError(f"key name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    return name


def check_quota(quota: dict | None) -> dict:
    """Only the known quota fields, each a positive number (``max_images_in_flight`` and ``burst`` integers)."""
    out = {}
    for name, value in (quota or {}).items():
        if name not in QUOTA_FIELDS:
            raise KeyStoreError(f"unknown quota field {name!r}; known: {', '.join(QUOTA_FIELDS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise KeyStoreError(f"quota {name} must be a positive number, got {value!r}")
        if name != "rate_per_s" and int(value) != value:
            raise KeyStoreError(f"quota {name} must be a whole number, got {value!r}")
        out[name] = float(value) if name == "rate_per_s" else int(value)
    return out


def check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1000:
        raise KeyStoreError(f"weight must be a number in (0, 1000], got {weight!r}")
    return float(weight)


class KeyStore:
    """Create, list, look up, change and revoke tenant keys in ``store`` (local or S3)."""

    def __init__(self, store: Store, clock=time.time):
        self.store = store
        self.clock = clock

    def _put(self, record: KeyRecord) -> None:
        self.store.put_bytes(f"{PREFIX}{record.sha256}.json", json.dumps(asdict(record), sort_keys=True).encode())

    def create(self, name: str, weight: float = 1.0, quota: dict | None = None) -> tuple[str, KeyRecord]:
        """A new key for tenant ``name`` (unique among live keys): ``(the key, shown only now, its record)``."""
        check_name(name)
        record_quota = check_quota(quota)
        weight = check_weight(weight)
        if any(r.name == name and not r.revoked for r in self.list()):
            raise KeyStoreError(
                f"a key named {name!r} already exists (revoke it first, or pick another name)", "key_exists"
            )
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name, key_hash(raw), weight, record_quota, self.clock())
        if not self.store.put_if_absent(f"{PREFIX}{record.sha256}.json", json.dumps(asdict(record)).encode()):
            raise KeyStoreError("key collision; try again")  # 256 random bits: never in practice
        return raw, record

    def list(self) -> list[KeyRecord]:
        """Every key record (revoked ones too), by name."""
        records = []
        for obj in self.store.list(PREFIX):
            try:
                records.append(KeyRecord(**json.loads(self.store.get_bytes(obj.key))))
            except ObjectNotFound:
                continue  # deleted while listing
        return sorted(records, key=lambda r: (r.name, r.created))

    def lookup(self, raw: str) -> KeyRecord | None:
        """The record of key ``raw`` (revoked or not), or None if no such key was ever created."""
        return self.get_hash(key_hash(raw))

    def get_hash(self, sha256: str) -> KeyRecord | None:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        try:
            return KeyRecord(**json.loads(self.store.get_bytes(f"{PREFIX}{sha256}.json")))
        except ObjectNotFound:
            return None

    def find(self, name_or_id: str) -> KeyRecord:
        """The live key named ``name_or_id``, else the key whose id it is; ``KeyStoreError`` if none."""
        records = self.list()
        for r in records:
            if r.name == name_or_id and not r.revoked:
                return r
        for r in records:
            if r.id == name_or_id:
                return r
        raise KeyStoreError(f"no key named {name_or_id!r}", "key_not_found")

    def revoke(self, name_or_id: str) -> KeyRecord:
        """Revoke a key: from the next lookup on (servers re-read within ``auth.key_cache_ttl_s``) it gets 401."""
        record = replace(self.find(name_or_id), revoked=True)
        self._put(record)
        return record

    def set(self, name_or_id: str, weight: float | None = None, quota: dict | None = None) -> KeyRecord:
        """Change a key's weight and quota overrides (a quota field set to None goes back to the default)."""
        record = self.find(name_or_id)
        merged = {**record.quota, **(quota or {})}
        merged = {k: v for k, v in merged.items() if v is not None}
        record = replace(
            record,
            weight=record.weight if weight is None else check_weight(weight),
            quota=check_quota(merged),
        )
        self._put(record)
        return record
