"""The stage contract: every message that crosses a replica boundary, one frozen dataclass each.

Read top to bottom, this is one request's trip through the graph::

    Ingress ──EncodeRequest──────────► TextEncoder.encode ──PromptEmbeddings──┐
    Ingress ──ConditioningInput──────► VAE.encode ──list[ImageConditioning]───┤ (img2img, inpainting)
    Ingress ──StyleImage─────────────► ImageEncoder.encode ──ImageEmbeddings──┤ (style_image: IP-Adapter)
    Ingress ──DenoiseParams──────────► Denoiser.denoise ◄─────────────────────┘
                                       Denoiser.denoise ──Denoised──┐
    Ingress ──DecodeParams───────────► VAE.decode ◄─────────────────┘
                                       VAE.decode ──DecodedImages──► Ingress

``Denoiser.denoise_stream`` yields ``Queued`` / ``Step`` / ``Preview`` progress events, then the
``Denoised`` result. Responses are chained (``DeploymentResponse`` passed as an argument), so tensors
go replica to replica through Ray's object store; nothing here is ever JSON. ``ConditioningInput``
and ``ImageConditioning`` live with the code that makes them (``engine/conditioning.py``).

Every stage call carries the request's tenant, so each stage's queue has the same fair order
(``engine/fair_queue.py``): ``EncodeRequest.tenant``, ``DenoiseParams.tenant``,
``DecodeParams.tenant``, ``StyleImage.tenant``, and ``VAE.encode``'s ``tenant`` argument.

No Ray in this module: the engine's tests and the ingress import it alike. Every field is read by
name on the other side, so a typo is an ``AttributeError`` at the sender's tests, not a ``KeyError``
inside a replica, and a type checker sees every seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# A request's per-step conditioning (prompt editing, alternation, AND): defined with the code that makes
# it, and part of this contract (PromptEmbeddings.schedule).
from .engine.prompts import PromptSchedule, ScheduledConditioning  # noqa: F401


@dataclass(frozen=True)
class AdapterUse:
    """One adapter of a request as a stage sees it: a pinned reference and its weight."""

    ref: str  # "name@version": immutable, so every replica loads the same weights
    weight: float


# -- Ingress -> TextEncoder -> Denoiser ---------------------------------------------------------


@dataclass(frozen=True)
class EncodeRequest:
    """A request's prompts; ``adapters`` are those with text-encoder weights, in the request's order.

    SDXL: ``adapters`` are those with weights on the first encoder, ``adapters_2`` on the second. An
    empty ``negative_prompt`` on SDXL means none given: zeros where the model forces them.
    """

    prompt: str  # may use A1111's syntax (weights, BREAK, [edits], [a|b], AND); <lora:...> tags are removed
    negative_prompt: str
    adapters: tuple[AdapterUse, ...] = ()
    adapters_2: tuple[AdapterUse, ...] = ()  # SDXL's text_encoder_2
    # The request's sampling steps: prompt editing, alternation and AND are scheduled over them. None:
    # no schedule (that syntax is text; weights and BREAK still apply).
    steps: int | None = None
    tenant: str = "anonymous"  # whose request: the fair order of the TextEncoder's batches
    tenant_weight: float | None = None  # its key's weight (graph/auth.py); None: denoiser.tenant_weights, else 1


@dataclass(frozen=True)
class PromptEmbeddings:
    """The TextEncoder's answer: both embeddings have the same number of 77-token chunks.

    SDXL: ``hidden`` is both encoders' penultimate states concatenated (768 + 1280 for SDXL), and
    the pooled embeddings are the second encoder's projected output for the first chunk.
    """

    prompt_embeds: torch.Tensor  # [tokens, hidden]; tokens = 77 * chunks
    negative_prompt_embeds: torch.Tensor  # [tokens, hidden]
    encode_ms: float
    pooled_prompt_embeds: torch.Tensor | None = None  # [pooled]; SDXL only
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # [pooled]; SDXL only
    # Prompt editing / alternation / AND: the conditioning per step (the embeddings above are then its
    # first part's and the negative's entries at step 0). None: the embeddings above serve every step.
    schedule: PromptSchedule | None = None
    encode_wait_ms: float = 0.0  # of encode_ms, the wait before its batch started (adapter slots, fair queue)


# -- Ingress -> Denoiser ------------------------------------------------------------------------


Size = tuple[int, int]  # (height, width) in pixels, diffusers' order


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (``StableDiffusionXLPipeline.__call__``'s arguments).

    Sizes are ``(height, width)``; ``None`` takes diffusers' default: the output size for
    ``original_size`` and ``target_size``, and for the negatives (used only when both negative
    sizes are given) the positive time ids.
    """

    original_size: Size | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)  # (top, left)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: Size | None = None

    def time_ids(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(add_time_ids, negative_add_time_ids)``, 6 numbers each, as diffusers' ``_get_add_time_ids``.

        >>> MicroConditioning().time_ids(1024, 768)
        ((1024, 768, 0, 0, 1024, 768), (1024, 768, 0, 0, 1024, 768))
        """
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        positive = (*original, *self.crops_coords_top_left, *target)
        if self.negative_original_size is not None and self.negative_target_size is not None:
            negative = (*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size)
        else:
            negative = positive
        return tuple(int(v) for v in positive), tuple(int(v) for v in negative)


@dataclass(frozen=True)
class DenoiseParams:
    """What the Denoiser needs of a request besides its embeddings: image ``k`` uses ``seed + k``."""

    num_images: int
    seed: int
    width: int  # pixels, a multiple of the VAE's scale factor
    height: int
    steps: int
    guidance_scale: float
    scheduler: str  # a name of engine/schedulers.py
    adapters: tuple[AdapterUse, ...] = ()  # those with UNet weights, in the request's order
    tenant: str = "anonymous"
    micro: MicroConditioning | None = None  # SDXL models only (None there: every default)
    # The tenant key's fair-share weight (graph/auth.py, from the key's record, never from a request field);
    # None: denoiser.tenant_weights, else 1.
    tenant_weight: float | None = None
    # IP-Adapter: the style image's scale, a number or per-block scales as diffusers' set_ip_adapter_scale takes
    # them ({"up": {"block_0": [0.0, 1.0, 0.0]}}); read only with the ImageEncoder's ImageEmbeddings.
    style_scale: float | dict = 1.0


# -- Ingress -> ImageEncoder -> Denoiser (IP-Adapter) ------------------------------------------


@dataclass(frozen=True, eq=False)
class StyleImage:
    """A request's reference image (``style_image``), decoded and checked by the planner (graph/style_inputs.py)."""

    pixels: np.ndarray  # [H, W, 3] uint8 RGB, as uploaded (EXIF orientation applied)
    digest: str  # sha256 of the pixels and their size: the ImageEncoder's cache key
    tenant: str = "anonymous"  # whose request: the fair order of the ImageEncoder's batches
    tenant_weight: float | None = None  # its key's weight (graph/auth.py); None: denoiser.tenant_weights, else 1


@dataclass(frozen=True)
class ImageEmbeddings:
    """The ImageEncoder's answer, as ``ip_adapter.encode_image`` (``StableDiffusionPipeline.encode_image``) makes it:
    plain IP-Adapter: the pooled ``image_embeds`` and zeros; plus: the penultimate hidden states of the image and of
    an all-zero image (the negative row's, with guidance)."""

    image_embeds: torch.Tensor  # [dim] (plain) or [tokens, dim] (plus), on the CPU
    negative_image_embeds: torch.Tensor  # the same shape
    encode_ms: float


@dataclass(frozen=True)
class Trace:
    """Where a request ran: shown to clients as ``trace`` (tests and operators read it)."""

    denoiser_replica: str = ""
    denoiser_adapter_loads: int = 0  # the replica's adapter loads so far

    def to_dict(self) -> dict:
        return {"denoiser_replica": self.denoiser_replica, "denoiser_adapter_loads": self.denoiser_adapter_loads}


@dataclass(frozen=True)
class Denoised:
    """The Denoiser's result: a request's final latents and the timings so far."""

    latents: torch.Tensor  # [num_images, latent channels, height / 8, width / 8], on the CPU
    encode_ms: float
    queue_ms: float  # the longest any of its images waited for the batch
    denoise_ms: float  # the slowest image's time in the batch
    trace: Trace = field(default_factory=Trace)
    encode_wait_ms: float = 0.0  # PromptEmbeddings.encode_wait_ms, passed on
    step_ms: float = 0.0  # of denoise_ms, the slowest image's time in the ticks that stepped it


# Progress events of ``Denoiser.denoise_stream``, as they change.


@dataclass(frozen=True)
class Queued:
    """No image of the request has started: ``position`` images go first (0 = next)."""

    position: int
    eta_s: float | None


@dataclass(frozen=True)
class Step:
    """The slowest image of the request is at ``step`` of ``steps`` (the request's own steps)."""

    step: int
    steps: int
    eta_s: float | None


@dataclass(frozen=True)
class Preview:
    """A low-resolution look at the slowest image (``engine/previews.py``)."""

    step: int
    steps: int
    image: str  # "data:image/png;base64,..."


DenoiseEvent = Queued | Step | Preview | Denoised


# -- Ingress -> VAE -> Ingress ------------------------------------------------------------------


@dataclass(frozen=True)
class Overlay:
    """Inpainting with ``preserve_unmasked``: the input's own pixels, pasted back where kept."""

    original: np.ndarray  # [H, W, 3] uint8, at the output size
    mask: np.ndarray  # [H, W] uint8: 1 = repaint, 0 = keep


@dataclass(frozen=True)
class DecodeParams:
    output_format: str  # "png", "jpeg" or "webp" (engine/images.py)
    overlay: Overlay | None = None
    tenant: str = "anonymous"  # whose request: the fair order of the VAE's batches
    tenant_weight: float | None = None  # its key's weight (graph/auth.py); None: denoiser.tenant_weights, else 1


@dataclass(frozen=True)
class DecodedImages:
    """The VAE's answer: one encoded file per image, and every stage's timing."""

    images: tuple[bytes, ...]
    encode_ms: float
    queue_ms: float
    denoise_ms: float
    decode_ms: float
    trace: Trace = field(default_factory=Trace)
    # The stages' queue waits, within encode_ms and decode_ms (queue_ms is the Denoiser's): per tenant in
    # lorafleet_tenant_queue_wait_ms{stage} (graph/auth.py).
    encode_wait_ms: float = 0.0
    decode_wait_ms: float = 0.0
    step_ms: float = 0.0  # Denoised.step_ms, passed on
