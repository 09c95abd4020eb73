"""The application's one typed config, read from serve_config.yaml's ``args``.

>>> AppConfig.load({"denoiser": {"max_rows_per_tick": 1}})   # doctest: +SKIP
ConfigError: denoiser.max_rows_per_tick: Input should be greater than or equal to 2
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from deployments.config import DenoiserConfig, ImageEncoderConfig, TextEncoderConfig, VAEConfig
from deployments.engine.config import LoRAConfig, ModelConfig, StrictConfig
from lora_registry.config import RegistryConfig


class ConfigError(ValueError):
    """Bad configuration; the message names each offending field."""


# A base model's name: what clients send as ``model`` (OpenAI's ``base:adapter@version`` splits on ':' and '@').
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelEntry(ModelConfig):
    """One base model of a multi-model application (``models:``): the ``model`` section's fields with a
    required ``name``, and its own TextEncoder / Denoiser / VAE sections, each merged over the top-level
    section of the same name (nested mappings such as ``autoscaling`` merge key by key; null replaces)."""

    name: str = Field(..., description="What clients send as `model` (letters, digits, '.', '_', '-'; 1-64).")
    text_encoder: dict | None = Field(None, description="This model's TextEncoder settings, over `text_encoder`.")
    denoiser: dict | None = Field(None, description="This model's Denoiser settings, over `denoiser`.")
    vae: dict | None = Field(None, description="This model's VAE settings, over `vae`.")
    image_encoder: dict | None = Field(
        None, description="This model's ImageEncoder settings (with ip_adapter), over `image_encoder`."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not MODEL_NAME.match(name):
            raise ValueError(
                f"must be 1-64 letters, digits, '.', '_' or '-' (not starting with one of those), got {name!r}"
            )
        return name


@dataclass(frozen=True)
class ServedModelConfig:
    """One base model as the graph binds it: its settings and its three deployments' (merged) sections.

    ``name`` is None for the single ``model`` section without a name: the name then comes from the model
    itself (``ModelInfo.name``). ``suffix`` tells its deployments apart: "" for the first model (its
    deployments keep the plain names TextEncoder, Denoiser, VAE), ``-<name>`` for the others."""

    name: str | None
    model: ModelConfig
    text_encoder: TextEncoderConfig
    denoiser: DenoiserConfig
    vae: VAEConfig
    suffix: str = ""
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)  # bound only with ip_adapter


def _merged(base: dict, override: dict) -> dict:
    """``override`` over ``base``; mappings in both merge key by key.

    >>> _merged({"a": 1, "s": {"x": 1, "y": 2}}, {"s": {"y": 3}})
    {'a': 1, 's': {'x': 1, 'y': 3}}
    """
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class AppConfig(StrictConfig):
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The base model and how to run it (one model; see `models`)."
    )
    models: list[ModelEntry] | None = Field(
        None,
        description=(
            "Several base models behind one ingress, each with its own deployments; the first is the default "
            "(requests without `model`). Replaces `model`. The top-level text_encoder / denoiser / vae sections "
            "are every model's defaults."
        ),
    )
    limits: LimitsConfig = Field(
        default_factory=lambda: LimitsConfig(), description="Per-request limits checked at the edge."
    )
    ingress: IngressConfig = Field(default_factory=lambda: IngressConfig(), description="HTTP ingress replicas.")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    image_encoder: ImageEncoderConfig = Field(
        default_factory=ImageEncoderConfig,
        description="The ImageEncoder (IP-Adapter's CLIP vision encoder) of models with ip_adapter.",
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="Per-request adapters and adapter slots.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Where adapters live (S3 or local).")
    admin: AdminConfig = Field(default_factory=lambda: AdminConfig(), description="Who may change the registry.")
    jobs: JobsConfig = Field(default_factory=lambda: JobsConfig(), description="Async jobs (/v1/jobs) and their store.")
    openai: OpenAIConfig = Field(
        default_factory=lambda: OpenAIConfig(), description="The OpenAI Images API (/v1/images/...): image URLs."
    )
    auth: AuthConfig = Field(
        default_factory=lambda: AuthConfig(),
        description="Tenant API keys, their weights and quotas (docs/security.md).",
    )
    admission: AdmissionConfig = Field(
        default_factory=lambda: AdmissionConfig(),
        description="Admission control at the ingress: past capacity, 503 over a fair share (graph/admission.py).",
    )

    @model_validator(mode="after")
    def _serve_autoscaling(self):
        from ray.serve.config import AutoscalingConfig

        if self.models is not None:
            if "model" in self.model_fields_set:
                raise ValueError("set `models` (several base models) or `model` (one), not both")
            if not self.models:
                raise ValueError("models: list at least one model")
            names = [m.name for m in self.models]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"models: each name must be unique; listed twice: {', '.join(twice)}")
        for served in self.served_models():
            where = "" if served.name is None or self.models is None else f"models[{served.name}]."
            for name in ("text_encoder", "denoiser", "vae", "image_encoder"):
                autoscaling = getattr(served, name).autoscaling
                if autoscaling is not None:
                    try:
                        AutoscalingConfig(**autoscaling)
                    except Exception as e:
                        raise ValueError(f"{where}{name}.autoscaling: {e}") from e
        return self

    def served_models(self) -> list[ServedModelConfig]:
        """Every base model with its deployments' sections, the default model first.

        Raises ``ValueError`` naming ``models[<name>].<section>.<field>`` for a bad per-model section."""
        if self.models is None:
            return [
                ServedModelConfig(
                    self.model.name,
                    self.model,
                    self.text_encoder,
                    self.denoiser,
                    self.vae,
                    image_encoder=self.image_encoder,
                )
            ]
        served = []
        for i, entry in enumerate(self.models):
            sections = {}
            for name, cls in (
                ("text_encoder", TextEncoderConfig),
                ("denoiser", DenoiserConfig),
                ("vae", VAEConfig),
                ("image_encoder", ImageEncoderConfig),
            ):
                top = getattr(self, name).model_dump(exclude_unset=True)
                try:
                    sections[name] = cls.model_validate(_merged(top, getattr(entry, name) or {}))
                except ValidationError as e:
                    raise ValueError(f"models[{entry.name}].{name}: {_problems(e)}") from None
            model = ModelConfig(**entry.model_dump(exclude={"text_encoder", "denoiser", "vae", "image_encoder"}))
            served.append(ServedModelConfig(entry.name, model, suffix="" if i == 0 else f"-{entry.name}", **sections))
        return served

    def upload_limit_bytes(self) -> int:
        """The ``POST /v1/adapters`` body cap: ``limits.max_upload_bytes``, or the adapter cap plus the form."""
        if self.limits.max_upload_bytes is not None:
            return self.limits.max_upload_bytes
        return self.registry.max_adapter_bytes + (1 << 20)

    @classmethod
    def load(cls, args: dict[str, Any] | None) -> AppConfig:
        """Validate ``args``; raise ``ConfigError`` naming every bad field."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise ConfigError(f"invalid lorafleet config: {_problems(e)}") from e


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())


# limits.max_side: auto = max(1024, 2 x the model's native side), within these bounds.
AUTO_MAX_SIDE = (1024, 2048)


class LimitsConfig(StrictConfig):
    """Per-request limits, checked at the edge (the ingress) before any work is queued."""

    max_side: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Largest width or height in pixels (64 to 4096), or auto: follow the model, max(1024, 2 x its native "
            "side) capped at 2048 (1024 for SD1.5 and the tiny models, 2048 for SDXL). SDXL's size conditioning "
            "(original_size, target_size, crops_coords_top_left) may go up to 4 x this."
        ),
    )
    min_side: int = Field(64, ge=8, description="Smallest width or height in pixels.")
    max_steps: int = Field(150, ge=1, le=1000, description="Most denoising steps per request.")
    max_num_images: int = Field(8, ge=1, le=64, description="Most images per request.")
    max_guidance_scale: float = Field(30.0, ge=0, description="Largest guidance_scale.")
    max_prompt_chunks: int = Field(
        3,
        ge=1,
        description=(
            "Longest prompt (and negative prompt), in CLIP chunks of 75 tokens: 3 = 225 tokens. Each chunk "
            "adds 77 tokens to the UNet's cross-attention context."
        ),
    )
    max_prompt_and_parts: int = Field(
        8,
        ge=1,
        le=63,
        description=(
            "Most AND parts in a prompt (A1111's composable diffusion). Each part is its own UNet row per step, "
            "beside the negative prompt's: keep it below denoiser.max_rows_per_tick."
        ),
    )
    max_image_bytes: int = Field(
        10_000_000, ge=1024, description="Largest uploaded image or mask (img2img, inpainting), in bytes."
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=4096,
        description="Most pixels an uploaded image may declare (4096 x 4096); checked before decoding.",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="A request still unanswered after this gets 504.")
    max_prompt_chars: int = Field(
        8192,
        ge=1,
        description=(
            "Longest prompt (and negative prompt) in characters, checked before tokenizing; the token limit "
            "(max_prompt_chunks) still applies."
        ),
    )
    max_prompt_bytes: int = Field(
        32_768, ge=1, description="Longest prompt (and negative prompt) in UTF-8 bytes, checked before tokenizing."
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description=(
            "Largest request body of a route without images (/v1/generate, the OpenAI and A1111 txt2img; where a "
            "served model has ip_adapter these carry a style image and get max_image_body_bytes); 413."
        ),
    )
    max_image_body_bytes: int = Field(
        48_000_000,
        ge=1024,
        description=(
            "Largest request body of a route that carries images (/v1/img2img, /v1/inpaint, /v1/jobs, "
            "/sdapi/v1/img2img, and the text-to-image routes where a model takes style_image); 413. Must hold an "
            "image, a mask and a style image of max_image_bytes, base64-encoded."
        ),
    )
    max_upload_bytes: int | None = Field(
        None,
        ge=1024,
        description=(
            "Largest POST /v1/adapters body (multipart), counted while it streams in; 413. Default: "
            "registry.max_adapter_bytes + 1 MiB for the form's other fields."
        ),
    )

    @field_validator("max_side", mode="before")
    @classmethod
    def _max_side(cls, value):
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 64 <= value <= 4096:
            raise ValueError(f"must be 'auto' or an integer in [64, 4096], got {value!r}")
        return value

    @model_validator(mode="after")
    def _sides(self):
        if self.max_side == "auto" and self.min_side > AUTO_MAX_SIDE[0]:
            raise ValueError(f"min_side ({self.min_side}) must be <= {AUTO_MAX_SIDE[0]}, the least max_side auto gives")
        if self.max_side != "auto" and self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self

    def max_side_for(self, native_side: int) -> int:
        """The largest side for a model whose native side is ``native_side``: ``max_side``, or ``auto``'s rule.

        >>> [LimitsConfig().max_side_for(n) for n in (256, 512, 1024)]   # tiny models, SD1.5, SDXL
        [1024, 1024, 2048]
        """
        if self.max_side != "auto":
            return self.max_side
        low, high = AUTO_MAX_SIDE
        return min(high, max(low, 2 * native_side))

    def for_model(self, native_side: int) -> LimitsConfig:
        """These limits with ``max_side`` a number for this model (what the checks read)."""
        return self.model_copy(update={"max_side": self.max_side_for(native_side)})

    def max_side_setting(self, model: str) -> str:
        """How the config names the side limit, for errors: ``limits.max_side`` or ``limits.max_side: auto for
        tiny-sdxl``."""
        return "limits.max_side" if self.max_side != "auto" else f"limits.max_side: auto for {model}"

    @model_validator(mode="after")
    def _image_bodies(self):
        need = 3 * base64_length(self.max_image_bytes) + 65_536  # image + mask + style image + the other fields
        if self.max_image_body_bytes < need:
            raise ValueError(
                f"max_image_body_bytes ({self.max_image_body_bytes}) must be >= {need}: an image, a mask and a "
                f"style image of max_image_bytes ({self.max_image_bytes}) in base64, and the other fields"
            )
        return self


def base64_length(size: int) -> int:
    """Characters of ``size`` bytes in base64 (padded)."""
    return 4 * ((size + 2) // 3)


class IngressConfig(StrictConfig):
    num_replicas: int = Field(1, ge=1, le=1024, description="HTTP ingress replicas.")
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests an ingress replica handles at once.")
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests waiting at the proxy before 503 (-1: unbounded)."
    )


class AdminConfig(StrictConfig):
    token: str | None = Field(
        None, description="Bearer token for registry writes; default: $LORAFLEET_ADMIN_TOKEN. Unset: writes refused."
    )
    protect_reads: bool = Field(False, description="Require the token for GET /v1/adapters too.")

    def resolved_token(self) -> str | None:
        import os

        return self.token or os.environ.get("LORAFLEET_ADMIN_TOKEN") or None


class JobsConfig(StrictConfig):
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
    cold_start_eta_s: float = Field(
        60.0,
        gt=0,
        description=(
            "The ETA a job shows while its model starts a replica from zero (phase loading_model), until a start "
            "has been measured (then the last one measured)."
        ),
    )
    webhook_secret: str | None = Field(
        None,
        description=(
            "Key that signs job webhooks (HMAC-SHA256); default: $LORAFLEET_WEBHOOK_SECRET. Unset: jobs with a "
            "webhook_url get 422."
        ),
    )
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook delivery (backoff doubles).")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Seconds one webhook POST may take.")
    webhook_backoff_s: float = Field(1.0, ge=0, le=300, description="Wait before the first retry; doubles after.")
    durable: bool = Field(
        True,
        description=(
            "Keep job records and results in the registry's store (jobs/<app>/), so that they outlive the Jobs "
            "replica: after a restart a finished job is readable until its TTL, a running one reads failed/interrupted."
        ),
    )

    def resolved_webhook_secret(self) -> str | None:
        import os

        from .webhooks import SECRET_ENV

        return self.webhook_secret or os.environ.get(SECRET_ENV) or None


class OpenAIConfig(StrictConfig):
    """The OpenAI Images API's routes (``/v1/images/generations``, ``/v1/images/edits``)."""

    image_url_ttl_s: float = Field(
        3600.0,
        ge=0,
        description=(
            "How long the URL of a response_format=url image serves it. The images are kept as a finished job in "
            "the job store (jobs.max_jobs bounds them with the jobs; durable as jobs.durable says); 0: expired at once."
        ),
    )


class QuotaConfig(StrictConfig):
    """One tenant's limits; a field left unset has no limit."""

    rate_per_s: float | None = Field(
        None, gt=0, description="Requests per second (token bucket refill), per ingress replica; unset: no limit."
    )
    burst: int | None = Field(
        None, ge=1, description="Requests a tenant may send at once before rate_per_s applies; default: ceil(rate)."
    )
    max_images_in_flight: int | None = Field(
        None, ge=1, description="Images a tenant may have generating at once, per ingress replica; unset: no limit."
    )


class AuthConfig(StrictConfig):
    """Who may generate and how much: tenant keys (``lorafleet keys ...``, ``/v1/admin/keys``) and quotas."""

    require_keys: bool = Field(
        False,
        description=(
            "Generation needs `Authorization: Bearer <tenant key>` (401 otherwise); the tenant is the key's name. "
            "Off: generation is open, the tenant is the hashed bearer key, else `user`, else the client address."
        ),
    )
    default_quota: QuotaConfig = Field(
        default_factory=QuotaConfig, description="Every tenant's limits unless `quotas` or its key overrides them."
    )
    quotas: dict[str, QuotaConfig] = Field(
        default_factory=dict,
        description=(
            "Per-tenant overrides of default_quota, by key name (keys required) or tenant id (`user:ann`, "
            "`addr:10.0.0.7`); a key's own stored quota wins over these."
        ),
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="How long an ingress trusts a key record it read before reading it again (revocations)."
    )
    max_tenant_labels: int = Field(
        50, ge=1, le=10_000, description="Distinct tenant label values in metrics; later tenants count as `other`."
    )


class AdmissionConfig(StrictConfig):
    """Admission control at each ingress replica, per base model (``graph/admission.py``, docs/operations.md)."""

    enabled: bool = Field(
        False,
        description=(
            "Past capacity, refuse a tenant over its fair share (503 overloaded, Retry-After) and let the others "
            "wait in weighted-fair order at the ingress. Off: every request goes straight to the stages' queues."
        ),
    )
    target_queue_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Capacity = measured images/s x this: the seconds of work a replica lets into a model's graph.",
    )
    min_images_in_flight: int = Field(
        4, ge=1, description="Capacity never below this many images (a cold start, before any image is measured)."
    )
    max_images_in_flight: int | None = Field(
        None,
        ge=1,
        description="A fixed capacity in images per ingress replica and model; unset: the measured one.",
    )
    throughput_half_life_s: float = Field(
        30.0, gt=0, description="Half-life of the measured throughput's decayed average (images per busy second)."
    )
    max_retry_after_s: int = Field(60, ge=1, le=3600, description="The largest Retry-After a refusal names.")


AppConfig.model_rebuild()


def load_serve_config(path: str | Path) -> tuple[dict, dict]:
    """Read serve_config.yaml; return (http_options, the lorafleet application's args)."""
    doc = yaml.safe_load(Path(path).read_text())
    apps = doc.get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications")
    return doc.get("http_options") or {}, apps[0].get("args") or {}
