"""The seam between the API front ends and the one validation step (``Planner.check_inputs``).

Every front end (native ``/v1/...``, OpenAI ``/v1/images/generations``, AUTOMATIC1111 ``/sdapi/v1/...``)
renames its fields once on the way in, into a ``GenerationInput`` (the native names), and once on the
way out, for errors (``FieldNames``). The checks themselves run once, on the canonical request, and
raise ``FieldError`` at canonical field paths (``width``, ``loras[0].scale``)::

    request, names = openai_images.to_input(body, tenant)     # n -> num_images, size -> width/height
    try:
        plan = planner.check_inputs(request)
    except FieldError as e:
        raise names.translate(e)                              # num_images -> n, in field and message
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import APIError, FieldError
from .schemas import GenerateRequest, LoRASpec


@dataclass(frozen=True)
class GenerationInput:
    """One generation request in native terms, before any check: what every front end produces.

    ``image`` (and ``mask``) make it img2img (inpainting); they are base64 or data URLs, decoded
    by the check. ``None`` sizes and ``strength`` take their defaults there.
    """

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int | None = None
    num_images: int = 1
    scheduler: str = "default"
    output_format: str = "png"
    loras: tuple[LoRASpec, ...] = ()
    tenant: str = "anonymous"
    image: str | None = None
    mask: str | None = None  # white = repaint
    strength: float | None = None  # default: 0.75 for img2img, 1.0 for inpainting
    preserve_unmasked: bool = True
    invert_mask: bool = False  # white = keep instead (A1111's inpainting_mask_invert)
    # SDXL's size and crop conditioning (``MICRO_FIELDS``): (height, width) / (top, left) pairs; None = default.
    original_size: tuple[int, ...] | None = None
    crops_coords_top_left: tuple[int, ...] | None = None
    target_size: tuple[int, ...] | None = None
    negative_original_size: tuple[int, ...] | None = None
    negative_crops_coords_top_left: tuple[int, ...] | None = None
    negative_target_size: tuple[int, ...] | None = None
    # IP-Adapter (issue 22): a reference image whose style the request takes (base64 or a data URL, decoded by
    # the check), and its scale: a number, or per-block scales as diffusers' ``set_ip_adapter_scale`` takes them
    # (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``). None: no style image (a scale without one is refused).
    style_image: str | None = None
    style_scale: float | dict | None = None


# SDXL's micro-conditioning, in ``deployments.messages.MicroConditioning``'s order: sizes are
# [height, width], crops [top, left] (diffusers' order).
MICRO_FIELDS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def check_text(request: GenerationInput, limits) -> None:
    """The request's text, before any tokenizing or lookup: valid Unicode everywhere, prompts within
    ``limits.max_prompt_chars`` characters and ``limits.max_prompt_bytes`` UTF-8 bytes.

    Cheap (one pass over each string) and first, so an oversized or malformed prompt costs the server
    nothing: the tokenizer's cost grows with the prompt, the token limit (``max_prompt_chunks``) is only
    known after it has run. A lone surrogate (``"\\ud800"``, legal in JSON, not in UTF-8) would fail
    deep inside the tokenizer or the metrics; here it is a 422 naming the field::

        check_text(GenerationInput(prompt="x" * 10_000), limits)
        # FieldError prompt_too_long: "prompt is 10000 characters; the limit is 8192 (limits.max_prompt_chars)"
    """
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if len(text) > limits.max_prompt_chars:  # before encoding: a huge prompt is refused in O(1)
            raise FieldError(
                422,
                "prompt_too_long",
                name,
                "{field} is {chars} characters; the limit is {limit} (limits.max_prompt_chars)",
                chars=len(text),
                limit=limits.max_prompt_chars,
            )
        size = len(_utf8(text, name))
        if size > limits.max_prompt_bytes:
            raise FieldError(
                422,
                "prompt_too_long",
                name,
                "{field} is {size} bytes in UTF-8; the limit is {limit} (limits.max_prompt_bytes)",
                size=size,
                limit=limits.max_prompt_bytes,
            )
    if request.model is not None:
        _utf8(request.model, "model")
    for i, spec in enumerate(request.loras):
        _utf8(spec.name, f"loras[{i}].name")
    _utf8(request.tenant, "user")


def _utf8(text: str, field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(
            422,
            "invalid_value",
            field,
            "{field} is not valid Unicode text: a lone surrogate at character {position}",
            position=e.start,
        ) from e


def native_input(body: GenerateRequest, tenant: str, output_format: str | None = None) -> GenerationInput:
    """A ``/v1/generate``-shaped body (``/v1/img2img``, ``/v1/inpaint``, ``/v1/jobs`` too): the native names
    are the canonical ones. ``output_format``: the format an ``Accept: image/...`` header asked for."""
    return GenerationInput(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=body.model,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_images=body.num_images,
        scheduler=body.scheduler,
        output_format=output_format if output_format and body.num_images == 1 else body.output_format,
        loras=tuple(body.loras),
        tenant=tenant,
        image=getattr(body, "image", None),
        mask=getattr(body, "mask", None),
        strength=getattr(body, "strength", None),
        preserve_unmasked=getattr(body, "preserve_unmasked", True),
        **{name: _pair(getattr(body, name)) for name in MICRO_FIELDS},
        style_image=body.style_image,
        style_scale=body.style_scale,
    )


def _pair(value: list[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


@dataclass(frozen=True)
class FieldNames:
    """How one front end names the canonical fields, for the errors it answers with.

    ``names``: canonical path (or a path's head: ``loras[0]`` covers ``loras[0].scale``) -> the
    endpoint's; the longest match wins, the rest of the path is kept. ``messages``: canonical field
    -> the whole message, where one field of the request stands for several canonical ones or for
    part of one (OpenAI's ``size``, A1111's ``batch_size × n_iter``).

    >>> names = FieldNames({"guidance_scale": "cfg_scale", "loras[0]": "model"})
    >>> names.outward("loras[0].scale"), names.outward("guidance_scale"), names.outward("steps")
    ('model.scale', 'cfg_scale', 'steps')
    """

    names: Mapping[str, str] = field(default_factory=dict)
    messages: Mapping[str, Callable[[FieldError], str]] = field(default_factory=dict)

    def outward(self, path: str) -> str:
        head = max(
            (key for key in self.names if path == key or path.startswith((key + ".", key + "["))), key=len, default=None
        )
        return path if head is None else self.names[head] + path[len(head) :]

    def translate(self, error: FieldError) -> APIError:
        """``error`` as this front end's clients see it: its field, and every field its message names."""
        custom = self.messages.get(error.field)
        message = custom(error) if custom is not None else error.render(self.outward)
        return APIError(error.status, error.code, message, self.outward(error.field), error.headers)


NATIVE = FieldNames()
