"""The application's one typed config, read from serve_config.yaml's ``args``.

>>> AppConfig.load({"denoiser": {"max_rows_per_tick": 1}})   # doctest: +SKIP
ConfigError: denoiser.max_rows_per_tick: Input should be greater than or equal to 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from deployments.engine.config import (
    DenoiserConfig,
    LimitsConfig,
    LoRAConfig,
    ModelConfig,
    TextEncoderConfig,
    VAEConfig,
    _Strict,
)
from lora_registry.config import RegistryConfig


class ConfigError(ValueError):
    """Bad configuration; the message names each offending field."""


class AppConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model and how to run it.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request limits checked at the edge.")
    ingress: IngressConfig = Field(default_factory=lambda: IngressConfig(), description="HTTP ingress replicas.")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="Per-request adapters and adapter slots.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Where adapters live (S3 or local).")
    admin: AdminConfig = Field(default_factory=lambda: AdminConfig(), description="Who may change the registry.")
    jobs: JobsConfig = Field(default_factory=lambda: JobsConfig(), description="Async jobs (/v1/jobs) and their store.")

    @model_validator(mode="after")
    def _serve_autoscaling(self):
        from ray.serve.config import AutoscalingConfig

        for name in ("text_encoder", "denoiser", "vae"):
            autoscaling = getattr(self, name).autoscaling
            if autoscaling is not None:
                try:
                    AutoscalingConfig(**autoscaling)
                except Exception as e:
                    raise ValueError(f"{name}.autoscaling: {e}") from e
        return self

    @classmethod
    def load(cls, args: dict[str, Any] | None) -> AppConfig:
        """Validate ``args``; raise ``ConfigError`` naming every bad field."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"invalid lorafleet config: {problems}") from e


class IngressConfig(_Strict):
    num_replicas: int = Field(1, ge=1, le=1024, description="HTTP ingress replicas.")
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests an ingress replica handles at once.")
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests waiting at the proxy before 503 (-1: unbounded)."
    )


class AdminConfig(_Strict):
    token: str | None = Field(
        None, description="Bearer token for registry writes; default: $LORAFLEET_ADMIN_TOKEN. Unset: writes refused."
    )
    protect_reads: bool = Field(False, description="Require the token for GET /v1/adapters too.")

    def resolved_token(self) -> str | None:
        import os

        return self.token or os.environ.get("LORAFLEET_ADMIN_TOKEN") or None


class JobsConfig(_Strict):
    """The ``Jobs`` deployment: one replica holds every async job, so any ingress replica sees each one."""

    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved for the Jobs replica.")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Calls the Jobs replica serves at once (each open event stream holds one)."
    )
    max_jobs: int = Field(
        1000, ge=1, description="Jobs kept at once; finished ones are evicted oldest-first, then 503 job_store_full."
    )
    ttl_s: float = Field(600.0, gt=0, description="How long a finished job (and its images) stays readable.")
    preview_every_steps: int = Field(
        5, ge=0, description="A latent preview every this many steps for event streams with previews=true; 0: none."
    )
    heartbeat_s: float = Field(15.0, gt=0, description="A `: keep-alive` comment on an idle event stream this often.")


AppConfig.model_rebuild()


def load_serve_config(path: str | Path) -> tuple[dict, dict]:
    """Read serve_config.yaml; return (http_options, the lorafleet application's args)."""
    doc = yaml.safe_load(Path(path).read_text())
    apps = doc.get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications")
    return doc.get("http_options") or {}, apps[0].get("args") or {}
