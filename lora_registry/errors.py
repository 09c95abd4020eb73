"""Errors the registry raises, each with the HTTP status the ingress should answer with.

Every error carries a machine-readable ``code`` and, for validation errors, the
first offending tensor keys (at most ``MAX_ERROR_KEYS``), so a client can fix
its file without guessing::

    try:
        registry.register(path, name="watercolor")
    except RegistryError as e:
        return JSONResponse({"error": e.to_dict()}, status_code=e.status)
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_ERROR_KEYS = 5


class RegistryError(Exception):
    """Base class: ``status`` (HTTP), ``code`` (stable string), ``message``, ``keys``."""

    status: int = 500
    default_code: str = "registry_error"

    def __init__(self, message: str, *, code: str | None = None, keys: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.keys = list(keys)[:MAX_ERROR_KEYS]

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "keys": self.keys, "status": self.status}

    def __reduce__(self):  # keeps code and keys when the error crosses processes (Ray)
        return _rebuild, (type(self), self.message, self.code, tuple(self.keys))

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class AdapterNotFoundError(RegistryError):
    """No such adapter name, or no such (or a deleted) version."""

    status = 404
    default_code = "not_found"


class InvalidAdapterError(RegistryError):
    """The upload (or the name / metadata given with it) is refused; nothing was stored."""

    status = 422
    default_code = "invalid_adapter"


class AdapterTooLargeError(RegistryError):
    """The upload is over ``max_adapter_bytes``; refused before its data is read."""

    status = 413
    default_code = "too_large"


class RegistryConflictError(RegistryError):
    """The request conflicts with the registry's state (base model mismatch, version race lost too often)."""

    status = 409
    default_code = "conflict"


class RegistryUnavailableError(RegistryError):
    """The store cannot be reached (after retries) and the local caches cannot answer."""

    status = 503
    default_code = "unavailable"


class RegistryCorruptionError(RegistryError):
    """A stored blob does not match the sha256 its manifest names, even after a fresh download."""

    status = 502
    default_code = "corrupt_blob"


def keys_phrase(keys: Sequence[str]) -> str:
    """``"a, b, c"`` for the first ``MAX_ERROR_KEYS`` keys, plus ``" (+N more)"``."""
    shown = ", ".join(keys[:MAX_ERROR_KEYS])
    extra = len(keys) - MAX_ERROR_KEYS
    return shown + (f" (+{extra} more)" if extra > 0 else "")


def _rebuild(cls, message, code, keys):
    return cls(message, code=code, keys=keys)
