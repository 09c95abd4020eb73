"""HTTP request and response bodies. Types are strict: ``"64"`` is not a width."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from deployments.engine.images import OUTPUT_FORMATS
from deployments.engine.schedulers import SCHEDULER_NAMES, canonical_name

MAX_SEED = 2**32 - 1
OutputFormat = Literal[tuple(OUTPUT_FORMATS)]  # type: ignore[valid-type]
# A sampler, maybe with a sigma schedule ("dpmpp_2m_karras"; engine/schedulers.py), or "default"; diffusers' class
# names stand for their samplers ("EulerAncestralDiscreteScheduler" is "euler_a"). Unknown: a one-line 422.
SchedulerName = Annotated[
    str, AfterValidator(canonical_name), WithJsonSchema({"type": "string", "enum": list(SCHEDULER_NAMES)})
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoRASpec(_Body):
    """One adapter of a request: ``{"name": "watercolor", "version": 2, "scale": 0.8}``."""

    name: str = Field(min_length=1, description="Registered adapter name.")
    version: int | None = Field(None, ge=1, description="Pinned version; default: the latest.")
    scale: float = Field(1.0, ge=0, description="Strength, 0 to lora.max_scale (default max 4).")


class _StyleFields(BaseModel):
    """IP-Adapter's fields (docs/ip_adapter.md): models served with an ip_adapter section (GET /v1/models:
    style_image). On the native bodies and OpenAI's generations; edits take them as form fields."""

    style_image: str | None = Field(
        None,
        description="A reference image whose style the output takes (IP-Adapter): base64 or a data URL; PNG, JPEG "
        "or WebP, within limits.max_image_bytes / max_image_pixels.",
    )
    style_scale: float | dict | None = Field(
        None,
        description="How strongly style_image steers, 0 to 2 (default 1.0); or per-block scales as diffusers' "
        'set_ip_adapter_scale takes them, e.g. SDXL style only (InstantStyle): {"up": {"block_0": [0.0, 1.0, 0.0]}}.',
    )


class GenerateRequest(_StyleFields, _Body):
    """``POST /v1/generate``. Omitted sizes take the model's native resolution."""

    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str = Field("", description="What to steer away from (guidance_scale > 1 only).")
    model: str | None = Field(None, description="Model name (GET /v1/models); default: the served model.")
    width: int | None = Field(None, description="Pixels, a multiple of 8.")
    height: int | None = Field(None, description="Pixels, a multiple of 8.")
    steps: int = Field(30, ge=1, description="Denoising steps (at most limits.max_steps).")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance; <= 1 disables it.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image k uses seed + k; chosen if omitted.")
    num_images: int = Field(1, ge=1, description="Images to generate (at most limits.max_num_images).")
    scheduler: SchedulerName = Field(
        "default",
        description="default (the model's own), or a sampler with an optional sigma schedule: euler_a, "
        "dpmpp_2m_karras, dpmpp_sde_exponential, ... (GET /v1/models lists them).",
    )
    output_format: OutputFormat = Field("png", description="png, jpeg or webp (lossless).")
    loras: list[LoRASpec] = Field(default_factory=list, description="Adapters to compose, in order.")
    user: str | None = Field(None, max_length=128, description="End-user id: the tenant for fair scheduling.")
    # SDXL's size and crop conditioning (StableDiffusionXLPipeline's arguments); SDXL models only (422 on SD1).
    original_size: list[int] | None = Field(
        None, description="SDXL only: [height, width] the image should seem to come from; default: the output size."
    )
    crops_coords_top_left: list[int] | None = Field(
        None, description="SDXL only: [top, left] of the crop it should look like; default [0, 0]."
    )
    target_size: list[int] | None = Field(
        None, description="SDXL only: [height, width] it should look like it was made for; default: the output size."
    )
    negative_original_size: list[int] | None = Field(
        None, description="SDXL only: original_size to steer away from (with negative_target_size)."
    )
    negative_crops_coords_top_left: list[int] | None = Field(
        None, description="SDXL only: [top, left] to steer away from (with both negative sizes); default [0, 0]."
    )
    negative_target_size: list[int] | None = Field(
        None, description="SDXL only: target_size to steer away from (with negative_original_size)."
    )


class GeneratedImage(BaseModel):
    b64: str
    seed: int
    width: int
    height: int


class Timings(BaseModel):
    queue_ms: float = Field(description="The longest any of its images waited in the Denoiser's fair queue.")
    encode_ms: float = Field(description="The TextEncoder, from the call to the embeddings (its waits included).")
    denoise_ms: float
    decode_ms: float
    encode_wait_ms: float = Field(
        0.0, description="Of encode_ms, the wait for adapter slots and a place in the TextEncoder's fair batches."
    )
    decode_wait_ms: float = Field(0.0, description="The wait for a place in the VAE's fair batches.")
    step_ms: float = Field(
        0.0,
        description=(
            "Of denoise_ms, the time in the UNet steps that advanced its slowest image; the rest is the ticks of "
            "other image sizes between them (and, if it was paused for a lighter tenant, the pause)."
        ),
    )


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    model: str
    loras: list[dict] = Field(default_factory=list, description="The adapters applied: ref (name@version), scale.")
    timings: Timings
    trace: dict = Field(
        default_factory=dict, description="Which Denoiser replica served the request, and its adapter-load count."
    )


# -- the OpenAI Images API (graph/openai_images.py) ------------------------------------------------

OpenAIBackground = Literal["auto", "opaque", "transparent"]
OpenAIQuality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
OpenAIResponseFormat = Literal["b64_json", "url"]


class _OpenAIFields(BaseModel):
    """The fields ``/v1/images/generations`` and ``/v1/images/edits`` share: OpenAI's, then lorafleet's extras."""

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description='A served model, or "base:adapter[@version]" for a LoRA.')
    n: int = Field(1, ge=1, description="Images (at most limits.max_num_images); image k uses seed + k.")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8), or "auto": the model\'s native size (edits: the image\'s).'
    )
    response_format: OpenAIResponseFormat | None = Field(
        None, description='"b64_json" (default) or "url": served for openai.image_url_ttl_s.'
    )
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description="jpeg / webp quality, 0-100 (100: best); default: the server's (jpeg 95, webp lossless).",
    )
    background: OpenAIBackground | None = Field(
        None, description="auto or opaque; transparent is refused (the models draw no alpha)."
    )
    quality: OpenAIQuality | None = Field(None, description="Accepted for compatibility; ignored (see steps).")
    stream: bool | None = Field(False, description="Server-Sent Events: partial images, then the image(s).")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="With stream: this many partial images (latent previews) before the final."
    )
    user: str | None = Field(None, max_length=128, description="End-user id; the tenant for fair scheduling.")
    safety_identifier: str | None = Field(None, max_length=128, description="OpenAI's successor of user (wins).")
    negative_prompt: str = ""
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    scheduler: SchedulerName = "default"


class OpenAIImagesRequest(_StyleFields, _OpenAIFields, _Body):
    """``POST /v1/images/generations`` in the OpenAI Images API shape, plus lorafleet's extras."""

    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted for compatibility; ignored.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for compatibility; ignored.")
    loras: list[LoRASpec] = Field(default_factory=list, description="More adapters, after the one in `model`.")


class OpenAIEditForm(_OpenAIFields):
    """``POST /v1/images/edits``'s form fields besides the files (``image`` or ``image[]``, ``mask``): values
    come as text, so types are read leniently (``"2"`` is an ``n``); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted for compatibility; ignored.")
    strength: float | None = Field(
        None, description="How far to move from the image, in (0, 1]; default 0.75, or 1.0 with a mask."
    )


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] | None = None
    output_format: OutputFormat | None = None
    size: str | None = None


# -- async jobs (/v1/jobs) ---------------------------------------------------------------


class Img2ImgRequest(GenerateRequest):
    """``POST /v1/img2img``: restyle an image. Omitted sizes take the image's, rounded down to a multiple of 8."""

    image: str = Field(description="The init image: base64 or a data URL; PNG, JPEG or WebP.")
    strength: float = Field(
        0.75, description="How far to move from the image, in (0, 1]: int(steps * strength) steps run."
    )


class InpaintRequest(GenerateRequest):
    """``POST /v1/inpaint``: repaint the white part of ``mask``; the rest of ``image`` is kept."""

    image: str = Field(description="The image: base64 or a data URL; PNG, JPEG or WebP.")
    mask: str = Field(description="Same size as image; white = repaint, black = keep.")
    strength: float = Field(1.0, description="In (0, 1]; 1 repaints the masked part from pure noise.")
    preserve_unmasked: bool = Field(True, description="Paste the image's own pixels back where the mask is black.")


class JobRequest(GenerateRequest):
    """``POST /v1/jobs``: the ``/v1/generate`` body; the job runs in the background.

    With ``image`` it is an img2img job, with ``image`` and ``mask`` an inpainting job (the
    ``/v1/img2img`` and ``/v1/inpaint`` fields and defaults).
    """

    image: str | None = Field(None, description="img2img / inpainting: the image (base64 or data URL).")
    mask: str | None = Field(None, description="Inpainting: white = repaint (needs image).")
    strength: float | None = Field(None, description="In (0, 1]; default 0.75 for img2img, 1.0 for inpainting.")
    preserve_unmasked: bool = Field(True, description="Inpainting: paste the unmasked pixels back.")
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="POSTed the job object, signed (X-Lorafleet-Signature), when the job ends; retried with backoff.",
    )


class JobCreated(BaseModel):
    id: str
    status: Literal["queued"]
    url: str = Field(description="GET it to poll the job object; DELETE it to cancel.")
    events_url: str = Field(description="Server-Sent Events of the job (?previews=true for previews).")


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class JobObject(BaseModel):
    """``GET /v1/jobs/{id}``. ``images`` only when done, ``error`` only when failed."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    phase: Literal["loading_model"] | None = Field(
        None, description="While queued: loading_model when its model is starting a replica (it scales from zero)."
    )
    model: str = Field("", description="The base model it runs on.")
    position: int | None = Field(description="Images ahead in the denoiser's queue (0 = next); null once running.")
    eta_s: float | None = Field(description="Estimated seconds to the end of denoising (measured step rate).")
    step: int
    steps: int
    progress: float = Field(ge=0, le=1)
    created: float = Field(description="Unix time.")
    updated: float = Field(description="Unix time of the last change.")
    images: list[GeneratedImage] | None = None
    error: JobError | None = None
    loras: list[dict] = Field(default_factory=list, description="The adapters applied: ref (name@version), scale.")
    seed: int
