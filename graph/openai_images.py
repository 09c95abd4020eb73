"""The OpenAI Images API (``POST /v1/images/generations``), translated at the edge into the native request.

Names in (``to_input``): ``n`` -> ``num_images``, ``size: "WxH"`` -> ``width`` / ``height``,
``model: "base:adapter@version"`` -> ``model`` and ``loras[0]`` (the body's own ``loras`` follow it);
the rest are native names already. Names out (``FieldNames``): the reverse, so errors name the
OpenAI field, e.g. ``{"field": "n", "message": "n must be in [1, 8], got 9"}``.
"""

from __future__ import annotations

import base64
import time

from .errors import APIError, FieldError
from .schemas import LoRASpec, OpenAIImage, OpenAIImagesRequest, OpenAIImagesResponse
from .validation import FieldNames, GenerationInput


def to_input(body: OpenAIImagesRequest, tenant: str) -> tuple[GenerationInput, FieldNames]:
    """The native request, and the OpenAI names of its fields for the errors it may get."""
    if body.response_format != "b64_json":
        raise APIError(
            400,
            "unsupported_response_format",
            f'response_format {body.response_format!r} is not served; use "b64_json"',
            "response_format",
        )
    width, height = parse_size(body.size)
    base, model_loras = parse_openai_model(body.model)
    request = GenerationInput(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=base,
        width=width,
        height=height,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_images=body.n,
        scheduler=body.scheduler,
        output_format=body.output_format,
        loras=(*model_loras, *body.loras),
        tenant=tenant,
    )
    names = {"num_images": "n", "width": "size", "height": "size"}
    if model_loras:  # loras[0] is the model's adapter; the body's loras[i] is loras[i + 1]
        names["loras[0]"] = "model"
        names.update({f"loras[{i + 1}]": f"loras[{i}]" for i in range(len(body.loras))})
    return request, FieldNames(names, messages={"width": _one_side_of_size, "height": _one_side_of_size})


def _one_side_of_size(error: FieldError) -> str:
    return f"size: {error.message}"  # "size: height must be a multiple of 8 in [64, 1024], got 60"


def to_response(images: tuple[bytes, ...]) -> OpenAIImagesResponse:
    return OpenAIImagesResponse(
        created=int(time.time()), data=[OpenAIImage(b64_json=base64.b64encode(d).decode()) for d in images]
    )


def parse_openai_model(model: str | None) -> tuple[str | None, list[LoRASpec]]:
    """``"tiny-sd:watercolor@2"`` -> (``"tiny-sd"``, [watercolor v2 at scale 1])."""
    if model is None or ":" not in model:
        return model, []
    base, _, adapter = model.partition(":")
    name, _, version = adapter.partition("@")
    if not name or (version and not (_is_ascii_number(version) and int(version) >= 1)):
        raise APIError(422, "invalid_value", f'model must look like "base:adapter[@version]", got {model!r}', "model")
    return base or None, [LoRASpec(name=name, version=int(version) if version else None)]


def _is_ascii_number(text: str) -> bool:
    """``"64"`` yes; ``"²"``, ``"６４"`` (Unicode digits ``str.isdigit`` accepts, ``int`` may not) and ``""`` no."""
    return text.isascii() and text.isdigit()


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"512x768"`` -> (512, 768); None -> the model's native size."""
    if size is None:
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not _is_ascii_number(w) or not _is_ascii_number(h):
        raise APIError(422, "invalid_value", f'size must look like "512x512", got {size!r}', "size")
    return int(w), int(h)
