"""Typed configuration of the deployments: replicas, resources, batching, queues (Ray-shaped).

The engine's own settings (the model, adapter slots) are in ``engine/config.py``; the edge's
(request limits, ingress, admin, jobs) in ``graph/config.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .engine.config import StrictConfig


class ResourceConfig(StrictConfig):
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


class ImageEncoderConfig(ResourceConfig):
    """The ImageEncoder (IP-Adapter's CLIP vision encoder), bound only for models with ``ip_adapter``."""

    max_batch_size: int = Field(16, ge=1, le=512, description="Style images encoded in one batch.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Wait for batch-mates before encoding.")
    cache_size: int = Field(
        1024, ge=0, description="Image embeddings kept in the LRU cache, keyed by the image's pixel digest."
    )


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
    preempt: bool = Field(
        True,
        description=(
            "Pause a running image of a tenant above its fair share of the rows (newest first, back to the front "
            "of its queue, resumed unchanged) when a tenant below its share would otherwise wait for a free row; "
            "and step the shape bucket of a tenant below its share first (others wait at most 3 ticks in a row)."
        ),
    )
    protected_tick_rows: int = Field(
        0,
        ge=0,
        le=1024,
        description=(
            "With preempt: the most rows of a tick that steps an image of a tenant below its fair share (its rows "
            "always go; other tenants' fill the rest, taking turns). 0: no cap. Where a tick's cost grows with its "
            "rows (CPU; GPU at full size) it keeps a light tenant's steps near their cost alone, at the cost of the "
            "flooder's throughput while the light tenant's images run."
        ),
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Run each tick's UNet step on static buffers padded to a row bucket (1, 2, 4, ... 64 rows), replayed "
            "from a CUDA graph captured per shape (engine/step_graphs.py): captured at start for the model's native "
            "size, on first use for others. auto = on with CUDA when the multi-LoRA kernel reads only its routing "
            "buffers (lora.kernel gather, auto's choice on CUDA); on elsewhere runs the same buffers eagerly."
        ),
    )


class VAEConfig(ResourceConfig):
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded (or images encoded) in one call.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Wait for batch-mates before decoding.")
    tile_above_px: int | Literal["auto"] | None = Field(
        "auto",
        description=(
            "Decode and encode an image in tiles when its larger side exceeds this many pixels, to bound the VAE's "
            "memory at 1024-2048 px: diffusers' enable_tiling (tiles of the VAE's sample_size px overlapping by a "
            "quarter, blended), equal to it bit for bit. auto: the VAE's sample_size (512 for SD1.5, 1024 for "
            "SDXL), i.e. exactly the images diffusers' enable_tiling tiles; null or 0: never tile. A value below "
            "the sample_size acts as it (an image within one tile is never tiled); one above it leaves images "
            "between the two untiled, where diffusers' enable_tiling would tile them."
        ),
    )

    @field_validator("tile_above_px", mode="before")
    @classmethod
    def _tile_above_px(cls, v):
        # `true` would otherwise pass as 1 px, and a negative size means nothing.
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"tile_above_px must be an integer >= 0 (pixels), 'auto' or null; got {v!r}")
        return v
