"""lorafleet's LoRA adapter registry: stores, manifests, validation, canonical form, caches.

The bottom layer: imports nothing from ``graph`` or ``deployments``. Callers
pass in what it needs (the base model's ``BaseModelSpec``).
"""

from .base_model import (
    BaseModelSpec,
    ModuleShape,
    base_model_spec,
    base_model_spec_from_configs,
    base_model_spec_from_dir,
    get_module,
)
from .cache import DiskCache, ManifestCache, MemoryCache
from .canonical import CANONICAL_FORMAT, CanonicalAdapter, LoraWeights, load_canonical, merge_into, save_canonical
from .config import RegistryConfig, default_registry_uri, open_registry
from .errors import (
    AdapterNotFoundError,
    AdapterTooLargeError,
    InvalidAdapterError,
    RegistryConflictError,
    RegistryCorruptionError,
    RegistryError,
    RegistryUnavailableError,
)
from .manifest import NAME_PATTERN, BaseModelRef, Manifest, check_name, format_ref, parse_ref
from .registry import AdapterListing, GcReport, Registry
from .stores import LocalStore, S3Options, S3Store, Store, open_store
from .targets import ServedTargets
from .validation import PreparedAdapter, prepare_adapter

__all__ = [
    "AdapterListing", "AdapterNotFoundError", "AdapterTooLargeError", "BaseModelRef", "BaseModelSpec",
    "CANONICAL_FORMAT", "CanonicalAdapter", "DiskCache", "GcReport", "InvalidAdapterError", "LocalStore",
    "LoraWeights", "Manifest", "ManifestCache", "MemoryCache", "ModuleShape", "NAME_PATTERN", "PreparedAdapter",
    "Registry", "RegistryConfig", "RegistryConflictError", "RegistryCorruptionError", "RegistryError",
    "RegistryUnavailableError", "S3Options", "S3Store", "ServedTargets", "Store", "base_model_spec",
    "base_model_spec_from_configs",
    "base_model_spec_from_dir", "check_name", "default_registry_uri", "format_ref", "get_module", "load_canonical",
    "merge_into", "open_registry", "open_store", "parse_ref", "prepare_adapter", "save_canonical",
]  # fmt: skip
