"""Typed configuration of the engine and its deployments.

Checked once, at start-up (``graph.config.AppConfig`` composes these): a bad
value fails with its field named, never later inside a replica.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    uri: str = Field(
        "builtin:tiny-sd",
        description="Diffusers model directory: a local path, s3://bucket/prefix, or builtin:tiny-sd.",
    )
    name: str | None = Field(None, description="Name clients use for the model; default: derived from the URI.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, float16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    cache_dir: str | None = Field(
        None, description="Local cache for S3 and builtin models; default $LORAFLEET_CACHE_DIR or ~/.cache/lorafleet."
    )
    deterministic: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Batch-invariant kernels, so an image never depends on its batch-mates (auto = on for CPU, off for CUDA)."
        ),
    )
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads per replica.")


class LoRAConfig(_Strict):
    max_loras_per_request: int = Field(4, ge=0, le=16, description="Adapters one request may compose.")
    max_scale: float = Field(4.0, gt=0, description="Largest per-adapter scale a request may ask for.")
    max_loras_per_replica: int = Field(
        8, ge=1, le=256, description="Adapter slots preallocated per Denoiser/TextEncoder replica."
    )
    max_rank: int = Field(64, ge=1, le=1024, description="Slots are padded to this rank; higher ranks get 422.")
    unet_target_modules: tuple[str, ...] = Field(
        ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
        description="UNet modules (path suffixes) that carry adapter slots.",
    )
    text_encoder_target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        description="Text-encoder modules (path suffixes) that carry adapter slots.",
    )
    kernel: Literal["auto", "grouped", "gather"] = Field(
        "auto",
        description=(
            "Multi-LoRA kernel: grouped (one product per adapter in the batch; exact, best on CPU) or gather "
            "(stacked ranks, two bmm per layer; fixed kernel count for GPUs); auto = gather on CUDA unless "
            "deterministic."
        ),
    )
    slot_wait_timeout_s: float = Field(
        60.0, gt=0, description="How long a request waits for a free adapter slot before 503."
    )


class ResourceConfig(_Strict):
    num_replicas: int = Field(1, ge=1, le=1024, description="Replicas of this deployment (without autoscaling).")
    autoscaling: dict | None = Field(
        None,
        description=(
            "Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, delays, policy); "
            "when set, num_replicas is ignored."
        ),
    )
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per replica (fractions allowed).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts at once.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting for a replica before callers get 503 (-1: unbounded)."
    )
    graceful_shutdown_timeout_s: float = Field(
        120.0, gt=0, description="On scale-down, how long a replica may finish its requests before it is stopped."
    )


class TextEncoderConfig(ResourceConfig):
    max_batch_size: int = Field(16, ge=1, le=512, description="Prompts encoded in one forward.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Wait for batch-mates before encoding.")
    cache_size: int = Field(4096, ge=0, description="Prompt embeddings kept in the LRU cache.")


class DenoiserConfig(ResourceConfig):
    max_rows_per_tick: int = Field(
        16, ge=2, le=1024, description="UNet rows per step across requests (an image with guidance takes 2)."
    )
    max_queued_images: int = Field(
        64, ge=1, description="Images one tenant may have waiting per replica; beyond it, 503 with Retry-After."
    )
    max_queued_images_total: int = Field(256, ge=1, description="Images waiting per replica over all tenants.")
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="Fair-share weight per tenant (API key or `user`); others get 1."
    )


class VAEConfig(ResourceConfig):
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded (or images encoded) in one call.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Wait for batch-mates before decoding.")


class LimitsConfig(_Strict):
    max_side: int = Field(1024, ge=64, le=4096, description="Largest width or height in pixels.")
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
    max_image_bytes: int = Field(
        10_000_000, ge=1024, description="Largest uploaded image or mask (img2img, inpainting), in bytes."
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=4096,
        description="Most pixels an uploaded image may declare (4096 x 4096); checked before decoding.",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="A request still unanswered after this gets 504.")

    @model_validator(mode="after")
    def _sides(self):
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self
