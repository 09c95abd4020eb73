"""Image-conditioned requests at the edge: decode and check the uploaded image (and mask), settle the
output size, plan the request, and attach what the VAE stage encodes.

Every check runs here, in the ingress, before any work is queued: a bad upload never reaches a model.
The order: the image (bytes, format, pixels), the mask (the same, plus its size), ``strength``, the
output size (``conditioning.resolve_size``), then the ordinary request checks (``Planner.plan``).
"""

from dataclasses import replace

import numpy as np

from deployments.engine import conditioning as cond
from deployments.messages import Overlay

from .config import LimitsConfig
from .errors import APIError
from .planning import Plan, Planner


def to_api_error(e: cond.ImageInputError, fields: dict[str, str]) -> APIError:
    """An ``ImageInputError`` as the 422 clients see, naming the endpoint's own field."""
    code = "invalid_image" if e.field in ("image", "mask") else "invalid_value"
    field = fields.get(e.field, e.field)
    return APIError(422, code, f"{field} {e.message}" if e.field in ("image", "mask") else e.message, field)


def plan_image_request(
    planner: Planner,
    limits: LimitsConfig,
    *,
    image: str,
    mask: str | None,
    strength: float,
    preserve_unmasked: bool = True,
    width: int | None = None,
    height: int | None = None,
    fields: dict[str, str] | None = None,
    **plan_kwargs,
) -> Plan:
    """A ``Plan`` for img2img (``mask`` None) or inpainting, with ``conditioning`` (and ``overlay``) set.

    ``image`` / ``mask``: base64 or data URLs. Without ``width`` / ``height`` the output has the
    image's size rounded down to a multiple of 8; with them the image (and mask) are resized.
    ``fields`` maps our names to the endpoint's (A1111: ``image`` -> ``init_images``).
    Blocking (decodes images): call it in a thread.
    """
    fields = fields or {}
    try:
        picture = _load(image, "image", limits)
        mask_image = None
        if mask is not None:
            mask_image = _load(mask, "mask", limits)
            cond.check_mask_size(picture, mask_image)
        cond.check_strength(strength, plan_kwargs.get("steps"))
        w, h = cond.resolve_size(
            picture.size, width, height, multiple=8, min_side=limits.min_side, max_side=limits.max_side
        )
    except cond.ImageInputError as e:
        raise to_api_error(e, fields) from e
    plan = planner.plan(width=w, height=h, fields=fields, **plan_kwargs)
    mask_tensor = cond.preprocess_mask(mask_image, w, h) if mask_image is not None else None  # [1, 1, H, W]
    overlay = None
    if mask_tensor is not None and preserve_unmasked:
        overlay = Overlay(cond.original_pixels(picture, w, h), mask_tensor[0, 0].numpy().astype(np.uint8))
    return replace(
        plan,
        conditioning=cond.ConditioningInput(
            image=cond.preprocess_image(picture, w, h),
            seeds=[plan.seed + k for k in range(plan.num_images)],
            strength=float(strength),
            mask=mask_tensor,
        ),
        overlay=overlay,
    )


def _load(value: str, field: str, limits: LimitsConfig):
    data = cond.decode_base64(value, field=field, max_bytes=limits.max_image_bytes)
    return cond.load_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, field=field)
