"""The style step of ``Planner.check_inputs``: ``style_image`` (IP-Adapter's reference image) and ``style_scale``.

The order: the model serves IP-Adapter at all (else 422 ``style_image_unsupported``), a scale needs an image,
the image (bytes, format, pixels: ``image_decoding``'s checks and limits, so a file that is too large, not an
image or a decompression bomb gets the same one-line 422 as ``image``, naming ``style_image``), then the scale:
a number in [0, ``MAX_STYLE_SCALE``], or per-block scales as diffusers' ``set_ip_adapter_scale`` takes them,
their blocks and lengths checked against the served UNet's layout (``StyleSupport``)::

    check_style_inputs(GenerationInput("x", style_image=b64, style_scale={"up": {"block_0": [0, 1, 0]}}), ...)
    # StyleImage(pixels=[H, W, 3] uint8, digest="3f2a..."), {"up": {"block_0": [0.0, 1.0, 0.0]}}

Errors name canonical fields (``style_image``, ``style_scale.up.block_0[1]``); each front end renames them.
Blocking (decodes the image): ``check_inputs`` runs in a thread.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from deployments.messages import StyleImage

from . import image_decoding as decoding
from .config import LimitsConfig
from .errors import FieldError
from .validation import GenerationInput

MAX_STYLE_SCALE = 2.0  # diffusers allows any scale; past 2 the image term swamps the prompt
DEFAULT_STYLE_SCALE = 1.0


@dataclass(frozen=True)
class StyleSupport:
    """A served model's IP-Adapter as the planner sees it: the UNet's layout, for per-block scales (no weights).

    ``blocks``: for ``down`` and ``up``, the indices of the blocks with cross-attention; ``layers``: the
    attention layers per such block (diffusers' ``_maybe_expand_lora_scales``: ``layers_per_block``, one
    more going up); ``mid``: whether the mid block has cross-attention.
    """

    variant: str  # "plain" or "plus" (the model's ip_adapter.variant)
    blocks: dict[str, tuple[int, ...]]
    layers: dict[str, int]
    mid: bool

    @classmethod
    def of_unet_config(cls, config: dict, variant: str) -> StyleSupport:
        """From a UNet's ``config.json`` (``UNet2DConditionModel``'s block types and ``layers_per_block``).

        >>> s = StyleSupport.of_unet_config({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
        ...     "mid_block_type": "UNetMidBlock2DCrossAttn"}, "plain")
        >>> s.blocks, s.layers, s.mid
        ({'down': (0,), 'up': (1,)}, {'down': 1, 'up': 2}, True)
        """
        per_block = config.get("layers_per_block", 2)
        if not isinstance(per_block, int):  # a per-block list: diffusers' expansion reads the int form only
            per_block = int(per_block[0])
        blocks = {
            updown: tuple(i for i, kind in enumerate(config.get(f"{updown}_block_types", ())) if "CrossAttn" in kind)
            for updown in ("down", "up")
        }
        mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
        return cls(variant, blocks, {"down": per_block, "up": per_block + 1}, "CrossAttn" in mid_type)

    def example(self) -> str:
        """A per-block scale for this model's layout, for error messages."""
        up = self.blocks["up"]
        if not up:
            return '{"mid": 1.0}'
        values = ", ".join("1.0" if i == 1 else "0.0" for i in range(self.layers["up"]))
        return f'{{"up": {{"block_{up[0]}": [{values}]}}}}'


def check_style_inputs(
    request: GenerationInput, limits: LimitsConfig, support: StyleSupport | None, model: str
) -> tuple[StyleImage | None, float | dict]:
    """Decode and check ``style_image`` and ``style_scale``; ``(None, 1.0)`` without a style image.

    The scale comes back normalised: numbers as floats (``{"up": {"block_0": [0, 1, 0]}}`` keeps its shape).
    """
    if request.style_image is None:
        if request.style_scale is not None:
            raise FieldError(422, "invalid_value", "style_scale", "{field} needs a {f[style_image]} (IP-Adapter)")
        return None, DEFAULT_STYLE_SCALE
    if support is None:
        raise FieldError(
            422,
            "style_image_unsupported",
            "style_image",
            "{field}: the model {model} is served without IP-Adapter weights (model.ip_adapter); "
            "GET /v1/models lists which models take a style image",
            model=model,
        )
    data = decoding.decode_base64(request.style_image, field="style_image", max_bytes=limits.max_image_bytes)
    image = decoding.load_image(
        data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, field="style_image"
    )
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    scale = DEFAULT_STYLE_SCALE if request.style_scale is None else check_style_scale(request.style_scale, support)
    return StyleImage(pixels=pixels, digest=image_digest(pixels)), scale


def image_digest(pixels: np.ndarray) -> str:
    """sha256 of the decoded pixels and their size: the same picture as PNG or WebP has one digest.

    >>> image_digest(np.zeros((2, 3, 3), np.uint8))[:12]
    '45f81c0f5b25'
    """
    h, w = pixels.shape[:2]
    return hashlib.sha256(f"{h}x{w}:".encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def check_style_scale(scale, support: StyleSupport) -> float | dict:
    """A number in [0, ``MAX_STYLE_SCALE``], or per-block scales for ``support``'s UNet (see the module docstring).

    Per block, as ``set_ip_adapter_scale``: ``{"down": s, "mid": s, "up": s}`` where ``down`` / ``up`` may be
    ``{"block_<i>": s}`` for blocks with cross-attention, and each ``s`` a number or a list of one number per
    attention layer of the block (or of one number). Unnamed blocks get 0 (no image term there).
    """
    if not isinstance(scale, dict):
        return _number(scale, "style_scale")
    unknown = sorted(set(scale) - {"down", "mid", "up"})
    if unknown:
        raise _scale_error(
            f"style_scale.{unknown[0]}",
            "{field}: per-block scales name down, mid and up only, e.g. {example}",
            example=support.example(),
        )
    out: dict = {}
    if "mid" in scale:
        if not support.mid:
            raise _scale_error("style_scale.mid", "{field}: the served UNet's mid block has no cross-attention")
        out["mid"] = _values(scale["mid"], "style_scale.mid", (1,))
    for updown in ("down", "up"):
        if updown not in scale:
            continue
        field = f"style_scale.{updown}"
        value, blocks, layers = scale[updown], support.blocks[updown], support.layers[updown]
        if not isinstance(value, dict):
            if not blocks:
                raise _scale_error(field, "{field}: the served UNet has no cross-attention " + updown + " blocks")
            out[updown] = _number(value, field)
            continue
        names = [f"block_{i}" for i in blocks]
        for key in value:
            if key not in names:
                raise _scale_error(
                    f"{field}.{key}",
                    "{field}: the served UNet's " + updown + " blocks with cross-attention are {names}",
                    names=", ".join(names) or "none",
                )
        out[updown] = {key: _values(v, f"{field}.{key}", (1, layers)) for key, v in value.items()}
    return out


def _values(value, field: str, lengths: tuple[int, ...]) -> float | list[float]:
    """A number, or a list of ``lengths`` numbers (one per attention layer of the block)."""
    if not isinstance(value, list):
        return _number(value, field)
    if len(value) not in lengths:
        raise _scale_error(
            field,
            "{field} has {n} scales; the served UNet's block has {layers} attention layers (give {allowed})",
            n=len(value),
            layers=lengths[-1],
            allowed=" or ".join(str(n) for n in sorted(set(lengths))),
        )
    return [_number(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _scale_error(field, "{field} must be a number in [0, {high}], got {value!r}", value=value)
    if not (math.isfinite(value) and 0 <= value <= MAX_STYLE_SCALE):
        raise _scale_error(field, "{field} must be in [0, {high}], got {value}", value=value)
    return float(value)


def _scale_error(field: str, template: str, **values) -> FieldError:
    return FieldError(422, "invalid_value", field, template, high=MAX_STYLE_SCALE, **values)
