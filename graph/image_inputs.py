"""The image step of ``Planner.check_inputs``: an img2img or inpainting request's uploads, decoded and checked.

The order: the image (bytes, format, pixels), the mask (the same, plus its size), ``strength``, then
the output size (``image_decoding.resolve_size``). Errors name canonical fields (``image``, ``mask``,
``strength``, ``width``, ``height``); each front end renames them (A1111: ``init_images``,
``denoising_strength``). Blocking (decodes images): ``check_inputs`` runs in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from deployments.engine.conditioning import ConditioningInput
from deployments.messages import Overlay

from . import image_decoding as decoding
from .config import LimitsConfig
from .errors import FieldError
from .validation import GenerationInput

DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}


@dataclass(frozen=True, eq=False)
class ImageInputs:
    """A request's decoded uploads and the output size they settle."""

    image: Image.Image  # RGB, as uploaded
    mask: Image.Image | None  # RGB, white = repaint (inverted already if the request asked); None: img2img
    width: int
    height: int
    strength: float
    preserve_unmasked: bool

    def prepare(self, seeds: list[int]) -> tuple[ConditioningInput, Overlay | None]:
        """What the VAE stage encodes, and for inpainting with ``preserve_unmasked`` the pixels pasted back."""
        w, h = self.width, self.height
        mask = decoding.preprocess_mask(self.mask, w, h) if self.mask is not None else None  # [1, 1, H, W]
        overlay = None
        if mask is not None and self.preserve_unmasked:
            overlay = Overlay(decoding.original_pixels(self.image, w, h), mask[0, 0].numpy().astype(np.uint8))
        image = decoding.preprocess_image(self.image, w, h)  # [1, 3, H, W]
        return ConditioningInput(image=image, seeds=seeds, strength=self.strength, mask=mask), overlay


def check_image_inputs(
    request: GenerationInput, limits: LimitsConfig, max_setting: str = "limits.max_side"
) -> ImageInputs | None:
    """Decode and check ``image`` / ``mask``, ``strength`` and the output size; None for text-to-image.

    Without ``width`` / ``height`` the output has the image's size rounded down to a multiple of 8;
    with them the image (and mask) are resized. ``limits.max_side`` is a number here (the model's:
    ``LimitsConfig.for_model``); ``max_setting`` is how errors name it.
    """
    if request.image is None:
        for name in ("mask", "strength"):
            if getattr(request, name) is not None:
                raise FieldError(422, "invalid_value", name, "{field} needs an {f[image]} (img2img / inpainting)")
        return None
    image = _decode(request.image, "image", limits)
    mask = None
    if request.mask is not None:
        mask = _decode(request.mask, "mask", limits, invert=request.invert_mask)
        decoding.check_mask_size(image, mask)
    strength = request.strength
    if strength is None:
        strength = DEFAULT_STRENGTH["img2img" if mask is None else "inpaint"]
    check_strength(strength, request.steps)
    width, height = decoding.resolve_size(
        image.size,
        request.width,
        request.height,
        multiple=8,
        min_side=limits.min_side,
        max_side=limits.max_side,
        max_setting=max_setting,
    )
    return ImageInputs(image, mask, width, height, float(strength), request.preserve_unmasked)


def check_strength(strength: float, steps: int) -> None:
    """``strength`` in (0, 1], leaving at least one of the ``int(steps * strength)`` steps diffusers runs."""
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise FieldError(
            422, "invalid_value", "strength", "{field} must be in the interval (0, 1], got {value!r}", value=strength
        )
    if steps >= 1 and int(steps * strength) < 1:  # other steps are refused by the steps check
        raise FieldError(
            422,
            "invalid_value",
            "strength",
            "{field} {value} with {steps} steps runs no step; need {field} >= 1/steps = {low:g}",
            value=strength,
            steps=steps,
            low=1 / steps,
        )


def _decode(value: str, field: str, limits: LimitsConfig, invert: bool = False) -> Image.Image:
    data = decoding.decode_base64(value, field=field, max_bytes=limits.max_image_bytes)
    return decoding.load_image(
        data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, field=field, invert=invert
    )
