"""Adapter names, references (``name`` / ``name@3``) and the immutable version manifest.

A manifest is written once, last, when a version is registered; it is never
rewritten. It names the canonical weights blob by sha256, so every cache below
it can be content-addressed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .errors import InvalidAdapterError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
MANIFEST_SCHEMA = "lorafleet.adapter/1"

MAX_DESCRIPTION_CHARS = 2000
MAX_TRIGGER_WORDS = 32
MAX_TRIGGER_WORD_CHARS = 100
MAX_TAGS = 16


def check_name(name: str) -> str:
    """Return ``name`` if it matches ``NAME_PATTERN``, else raise ``InvalidAdapterError`` (code ``invalid_name``)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterError(
            f"adapter name {name!r} is invalid: it must match {NAME_PATTERN} "
            "(lowercase letters, digits, '.', '_', '-'; 1-64 characters; starting with a letter or digit)",
            code="invalid_name",
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split an adapter reference into ``(name, version)``; the version is ``None`` for "latest".

    >>> parse_ref("watercolor")
    ('watercolor', None)
    >>> parse_ref("watercolor@3")
    ('watercolor', 3)
    """
    if not isinstance(ref, str):
        raise InvalidAdapterError(f"adapter reference must be a string, got {type(ref).__name__}", code="invalid_ref")
    name, sep, version_text = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    # ASCII digits only: "²" and "６" pass str.isdigit but are no version number.
    if not (version_text.isascii() and version_text.isdigit()) or version_text.startswith("0"):
        raise InvalidAdapterError(
            f"adapter reference {ref!r} is invalid: the part after '@' must be a version number >= 1",
            code="invalid_ref",
        )
    return name, int(version_text)


def format_ref(name: str, version: int | None) -> str:
    return name if version is None else f"{name}@{version}"


MAX_TRAINING_BYTES = 16_384


def check_training(training: dict | None) -> None:
    """``training`` must be a JSON object of at most ``MAX_TRAINING_BYTES`` bytes, or None."""
    if training is None:
        return
    if not isinstance(training, dict):
        raise InvalidAdapterError("training must be a JSON object", code="invalid_metadata")
    try:
        size = len(json.dumps(training, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"training is not JSON-serialisable: {e}", code="invalid_metadata") from e
    if size > MAX_TRAINING_BYTES:
        raise InvalidAdapterError(
            f"training is {size} bytes of JSON; the limit is {MAX_TRAINING_BYTES}", code="invalid_metadata"
        )


def check_metadata(description: str, trigger_words: list[str], tags: list[str]) -> None:
    """Bounds on the free-form fields a user supplies at registration, naming the field at fault."""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidAdapterError(
            f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters", code="invalid_metadata"
        )
    if len(trigger_words) > MAX_TRIGGER_WORDS:
        raise InvalidAdapterError(f"trigger_words: at most {MAX_TRIGGER_WORDS} allowed", code="invalid_metadata")
    for word in trigger_words:
        if not isinstance(word, str) or not word.strip() or len(word) > MAX_TRIGGER_WORD_CHARS:
            raise InvalidAdapterError(
                f"trigger_words: {word!r} must be a non-empty string of at most {MAX_TRIGGER_WORD_CHARS} characters",
                code="invalid_metadata",
            )
    if len(tags) > MAX_TAGS:
        raise InvalidAdapterError(f"tags: at most {MAX_TAGS} allowed", code="invalid_metadata")
    for tag in tags:
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            raise InvalidAdapterError(f"tags: {tag!r} must match {TAG_RE.pattern}", code="invalid_metadata")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class BaseModelRef:
    """Which base model an adapter fits: an informational family and the exact module-shape fingerprint."""

    family: str
    fingerprint: str


@dataclass(frozen=True)
class Manifest:
    """One immutable adapter version, as stored at ``adapters/<name>/<version:08d>.json``."""

    name: str
    version: int
    base_model: BaseModelRef
    format: str  # the stored weights' format: always canonical.CANONICAL_FORMAT
    source_format: str  # what was uploaded: "diffusers" (PEFT / diffusers keys) or "kohya"
    rank: int  # the largest rank over the adapted modules
    alpha: float  # the most common alpha; each module's own alpha is in the weights
    target_modules: tuple[str, ...]  # canonical module names, "unet.<path>" / "text_encoder[_2].<path>"
    has_text_encoder: bool
    dtype: str  # "float16" or "float32"
    sha256: str  # of the canonical weights blob
    size_bytes: int  # of the canonical weights blob
    created_at: str  # ISO 8601, UTC
    description: str = ""
    trigger_words: tuple[str, ...] = field(default_factory=tuple)
    tags: tuple[str, ...] = field(default_factory=tuple)
    # How the adapter was made, when lorafleet trained it (``lorafleet train``): settings, data, loss.
    training: dict | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = MANIFEST_SCHEMA
        for key in ("target_modules", "trigger_words", "tags"):
            d[key] = list(d[key])
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """Parse a stored manifest; a malformed one raises ``ValueError`` naming the field."""
        if not isinstance(d, dict):
            raise ValueError("manifest must be a JSON object")
        if d.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"manifest schema is {d.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
        try:
            base = d["base_model"]
            return cls(
                name=check_name(d["name"]),
                version=_typed(d, "version", int),
                base_model=BaseModelRef(
                    family=_typed(base, "family", str), fingerprint=_typed(base, "fingerprint", str)
                ),
                format=_typed(d, "format", str),
                source_format=_typed(d, "source_format", str),
                rank=_typed(d, "rank", int),
                alpha=float(_typed(d, "alpha", (int, float))),
                target_modules=tuple(_typed(d, "target_modules", list)),
                has_text_encoder=_typed(d, "has_text_encoder", bool),
                dtype=_typed(d, "dtype", str),
                sha256=_typed(d, "sha256", str),
                size_bytes=_typed(d, "size_bytes", int),
                created_at=_typed(d, "created_at", str),
                description=_typed(d, "description", str),
                trigger_words=tuple(_typed(d, "trigger_words", list)),
                tags=tuple(_typed(d, "tags", list)),
                training=_typed(d, "training", (dict, type(None))) if "training" in d else None,
            )
        except KeyError as e:
            raise ValueError(f"manifest lacks field {e.args[0]!r}") from e
        except InvalidAdapterError as e:
            raise ValueError(f"manifest field 'name': {e.message}") from e

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls.from_dict(json.loads(data))


def _typed(d: dict, key: str, types):
    value = d[key]
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        raise ValueError(f"manifest field {key!r} has type {type(value).__name__}")
    return value
