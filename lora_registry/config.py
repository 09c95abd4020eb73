"""Typed registry configuration, checked at start-up (a bad field fails with its name).

>>> config = RegistryConfig(uri="s3://adapters/prod", disk_cache_bytes=20 << 30)   # doctest: +SKIP
>>> registry = open_registry(config, base=spec)                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base_model import BaseModelSpec
from .cache import DiskCache, MemoryCache
from .registry import Registry
from .stores import open_store
from .targets import ServedTargets
from .validation import DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_DELTA_RMS, DEFAULT_MAX_RANK, FP16_MAX, WeightLimits

REGISTRY_ENV = "LORAFLEET_REGISTRY"


def default_registry_uri() -> str:
    """``$LORAFLEET_REGISTRY``, else the local directory ``~/.cache/lorafleet/registry``."""
    return os.environ.get(REGISTRY_ENV) or str(Path.home() / ".cache" / "lorafleet" / "registry")


def default_cache_dir() -> str:
    base = os.environ.get("LORAFLEET_CACHE_DIR") or str(Path.home() / ".cache" / "lorafleet")
    return str(Path(base) / "adapters")


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(default_factory=default_registry_uri, description="s3://bucket/prefix or a local directory")
    cache_dir: str | None = Field(
        None,
        description=(
            "local disk cache of adapter blobs; default $LORAFLEET_CACHE_DIR/adapters, resolved on each node "
            "(so nodes with their own LORAFLEET_CACHE_DIR keep their own cache)"
        ),
    )
    disk_cache_bytes: int = Field(10 << 30, gt=0, description="disk cache cap; least recently used blobs go first")
    memory_cache_bytes: int = Field(2 << 30, gt=0, description="host-memory cache cap for loaded adapters")
    max_rank: int = Field(DEFAULT_MAX_RANK, ge=1, le=1024, description="highest LoRA rank accepted at registration")
    max_adapter_bytes: int = Field(DEFAULT_MAX_ADAPTER_BYTES, gt=0, description="largest upload accepted")
    max_abs_weight: float = Field(
        FP16_MAX,
        gt=0,
        description=(
            "largest |weight| of an adapter's A and B accepted at registration; default float16's range (GPU "
            "replicas serve in fp16), raise it only for a registry served in fp32/bf16 alone"
        ),
    )
    max_delta_rms: float = Field(
        DEFAULT_MAX_DELTA_RMS,
        gt=0,
        description="largest RMS of a layer's update alpha/r * B @ A (at scale 1) accepted at registration",
    )
    manifest_ttl_s: float = Field(
        5.0, ge=0, description="how long a replica trusts its listing; bounds how late it sees a deletion"
    )
    outage_backoff_s: float = Field(5.0, ge=0, description="after a store outage, fail fast this long before retrying")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default: the AWS chain")
    s3_region: str | None = Field(None, description="S3 region; default: the AWS chain")
    s3_connect_timeout_s: float = Field(2.0, gt=0, description="per-request connect timeout")
    s3_read_timeout_s: float = Field(20.0, gt=0, description="per-request read timeout")
    s3_max_attempts: int = Field(3, ge=1, le=10, description="tries per S3 request (standard retry mode, backoff)")

    @model_validator(mode="after")
    def _s3_fields_need_s3(self):
        if not self.uri.startswith("s3://") and (self.s3_endpoint_url or self.s3_region):
            raise ValueError(f"s3_endpoint_url / s3_region are set but uri {self.uri!r} is not an s3:// URI")
        return self

    def s3_options(self) -> dict:
        if not self.uri.startswith("s3://"):
            return {}
        return {
            "endpoint_url": self.s3_endpoint_url,
            "region_name": self.s3_region,
            "connect_timeout_s": self.s3_connect_timeout_s,
            "read_timeout_s": self.s3_read_timeout_s,
            "max_attempts": self.s3_max_attempts,
        }


def open_registry(
    config: RegistryConfig,
    base: BaseModelSpec | None = None,
    *,
    caches: bool = True,
    targets: ServedTargets | None = None,
) -> Registry:
    """Build the store, caches and ``Registry`` a config describes (``caches=False``: no disk or memory cache).

    ``targets``: the modules the serving side carries adapter slots on, so registration refuses adapters it
    could never apply (see ``targets``); ``None`` validates against ``base`` alone."""
    store = open_store(config.uri, **config.s3_options())
    return Registry(
        store,
        base=base,
        cache=DiskCache(default_cache_dir() if config.cache_dir is None else config.cache_dir, config.disk_cache_bytes)
        if caches
        else None,
        memory=MemoryCache(config.memory_cache_bytes) if caches else None,
        max_rank=config.max_rank,
        max_adapter_bytes=config.max_adapter_bytes,
        weight_limits=WeightLimits(config.max_abs_weight, config.max_delta_rms),
        manifest_ttl_s=config.manifest_ttl_s,
        outage_backoff_s=config.outage_backoff_s,
        targets=targets,
    )
