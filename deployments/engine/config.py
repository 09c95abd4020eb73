"""Typed configuration of the engine: the model and its adapter slots.

Checked once, at start-up (``graph.config.AppConfig`` composes these with the
deployments' ``deployments/config.py`` and the edge's ``graph/config.py``): a
bad value fails with its field named, never later inside a replica.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictConfig(BaseModel):
    """Every config section: unknown keys are errors (a typo never passes silently), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IPAdapterConfig(StrictConfig):
    """IP-Adapter weights served with a model (``style_image`` requests; docs/ip_adapter.md)."""

    uri: str = Field(
        "builtin",
        min_length=1,
        description=(
            "A directory laid out as h94/IP-Adapter's models/ folder (image_encoder/ and the weights file): a local "
            "path, file:// or s3://bucket/prefix; builtin: the builtin model's tiny IP-Adapter (builtin:* models only)."
        ),
    )
    variant: Literal["plain", "plus"] = Field(
        "plain",
        description=(
            "plain: the encoder's pooled image_embeds projected to 4 tokens; plus: its penultimate hidden states "
            "through the resampler. Checked against the weights file at start."
        ),
    )
    weights: str | None = Field(
        None,
        min_length=1,
        description=(
            "The weights file (diffusers' IP-Adapter format, .safetensors or .bin), relative to uri, e.g. "
            "ip-adapter_sd15.safetensors; default: ip-adapter.safetensors (plain) / ip-adapter-plus.safetensors (plus)."
        ),
    )
    image_encoder: str = Field(
        "image_encoder",
        min_length=1,
        description="The CLIPVisionModelWithProjection directory, relative to uri (SDXL plain: sdxl_models/...).",
    )

    def weights_name(self) -> str:
        from .builtin import IP_ADAPTER_FILES

        return self.weights if self.weights is not None else IP_ADAPTER_FILES[self.variant]


class ModelConfig(StrictConfig):
    uri: str = Field(
        "builtin:tiny-sd",
        description=(
            "The base model: a diffusers directory (local path or s3://bucket/prefix), one original-layout "
            ".safetensors checkpoint (local, file:// or s3://), or builtin:tiny-sd / tiny-sd-inpaint / "
            "tiny-sdxl / tiny-sdxl-inpaint. Pickle checkpoints (.ckpt, .pt, ...) are refused."
        ),
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
    tf32: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "TensorFloat-32 matmuls and convolutions for float32 weights on CUDA (Ampere and later): auto = on for "
            "a float32 model on CUDA unless deterministic; off keeps full float32 products."
        ),
    )
    channels_last: bool = Field(
        False,
        description="The UNet (and VAE) in channels_last memory format on CUDA; measure with `make gpu-suite`.",
    )
    compile: Literal["none", "regional"] = Field(
        "none",
        description=(
            "regional: torch.compile the UNet's repeated transformer blocks (diffusers' compile_repeated_blocks), "
            "multi-LoRA layers included; adapters are data in the slot buffers, so changing them never recompiles "
            "(a new image size or routing width compiles once). Needs deterministic off."
        ),
    )
    compile_backend: str = Field(
        "inductor", min_length=1, description="torch.compile backend for model.compile (inductor; eager in tests)."
    )
    ip_adapter: IPAdapterConfig | None = Field(
        None,
        description=(
            "IP-Adapter weights: requests may send style_image (an ImageEncoder deployment is bound for the model). "
            "null: served without; style_image gets 422 style_image_unsupported."
        ),
    )

    @model_validator(mode="after")
    def _compile_is_not_deterministic(self):
        if self.compile != "none" and self.deterministic == "on":
            raise ValueError(
                "model.compile: regional needs model.deterministic off or auto "
                "(compiled kernels are not batch-invariant)"
            )
        return self

    @model_validator(mode="after")
    def _builtin_ip_adapter(self):
        if self.ip_adapter is not None and self.ip_adapter.uri == "builtin" and not self.uri.startswith("builtin:"):
            raise ValueError(
                "model.ip_adapter.uri: builtin is the builtin models' tiny IP-Adapter; "
                f"for {self.uri!r} give the weights' directory"
            )
        return self

    @field_validator("uri")
    @classmethod
    def _no_pickle(cls, uri: str) -> str:
        """A pickle checkpoint fails at start-up, naming the field, never later inside a replica."""
        from .single_file import refuse_pickle

        refuse_pickle(uri)
        return uri


class LoRAConfig(StrictConfig):
    max_loras_per_request: int = Field(4, ge=0, le=16, description="Adapters one request may compose.")
    max_scale: float = Field(4.0, gt=0, description="Largest per-adapter scale a request may ask for.")
    max_loras_per_replica: int = Field(
        256,
        ge=1,
        le=4096,
        description=(
            "Adapters a Denoiser/TextEncoder replica can hold at once (slot handles; memory is "
            "lora.slot_memory_bytes, paid per rank)."
        ),
    )
    max_rank: int = Field(128, ge=1, le=1024, description="Highest adapter rank served; higher ranks get 422.")
    slot_memory_bytes: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Bytes of adapter weights per replica and model component, in pages of one rank (an adapter of rank r "
            "takes r pages). auto: 1 GiB on CPU, 10% of the GPU's memory on CUDA; never more than "
            "max_loras_per_replica adapters at max_rank need."
        ),
    )
    unet_target_modules: tuple[str, ...] = Field(
        (
            # attention, its projections and feed-forward (what LoRA trainers target by default)
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            # LoCon / LyCORIS (kohya conv_dim): resnets, samplers, conv_in / conv_out, the time/added embeddings;
            # every suffix matches on every family (SD1.x has no add_embedding: linear_N is its time embedding's)
            "conv1",
            "conv2",
            "conv_shortcut",
            "time_emb_proj",
            "downsamplers.0.conv",
            "upsamplers.0.conv",
            "conv_in",
            "conv_out",
            "linear_1",  # time_embedding.linear_1, and SDXL's add_embedding.linear_1
            "linear_2",
        ),
        description=(
            "UNet modules (path suffixes) that carry adapter slots. The default is every Linear / Conv2d of SD1.x, "
            "SD2.x and SDXL UNets, so LoCon adapters are served; the registry refuses adapters with weights "
            "elsewhere. Cost: one page (rank) spans every targeted layer, so the default pages are 2.5x the "
            "attention-only ones on SD1.x (2.0 vs 0.8 MiB in fp16) and 1.16x on SDXL: listing only the first "
            "eight suffixes holds 2.5x the adapter ranks on SD1.x, and refuses LoCon at registration."
        ),
    )
    text_encoder_target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        description="Text-encoder modules (path suffixes) that carry adapter slots.",
    )
    kernel: Literal["auto", "grouped", "gather", "row-invariant"] = Field(
        "auto",
        description=(
            "Multi-LoRA kernel (engine/multi_lora.py): grouped (one product per adapter in the batch; exact, best "
            "on CPU), gather (stacked ranks, two bmm per layer; fixed kernel count for GPUs and CUDA graphs) or "
            "row-invariant (through the batch-invariant tiles: one batched product per pass and rank where "
            "checked exact, else per adapter); auto = row-invariant when deterministic, else gather on CUDA, "
            "else grouped."
        ),
    )

    @field_validator("slot_memory_bytes")
    @classmethod
    def _positive_memory(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"slot_memory_bytes must be >= 1 or 'auto', got {v}")
        return v

    def memory_bytes(self, device) -> int:
        """``slot_memory_bytes`` in bytes on ``device`` (``auto`` resolved; the cap to slots x max_rank is the
        model's, see ``ModelAdapters``)."""
        if self.slot_memory_bytes != "auto":
            return int(self.slot_memory_bytes)
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            return torch.cuda.get_device_properties(device).total_memory // 10
        return 1 << 30

    slot_wait_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "TextEncoder: how long a request waits for its adapters to become resident before 503 (the Denoiser's "
            "requests wait in its fair queue instead)."
        ),
    )
