"""Uploaded images at the edge: base64 -> bytes -> a checked RGB image -> the tensors the VAE stage encodes.

The path of an uploaded image (img2img, inpainting), top to bottom:

1. ``decode_base64`` (base64 or a data URL) and ``load_image``: PNG, JPEG or
   WebP only, a byte cap before decoding and a pixel cap read from the header
   before the pixels are decoded (decompression bombs), EXIF orientation, RGB
   out; a mask may be inverted here (A1111's ``inpainting_mask_invert``).
2. ``resolve_size``: the output size (see its rule) and ``check_mask_size``.
3. ``preprocess_image`` / ``preprocess_mask``: tensors exactly as diffusers'
   ``VaeImageProcessor.preprocess`` makes them (Lanczos resize, [-1, 1]; the
   mask binarised to {0, 1}, white = repaint), and ``original_pixels`` for
   pasting the unmasked part back.

Then the engine takes over (``deployments/engine/conditioning.py``: VAE encode, noise, overlay).
Every check raises ``FieldError`` naming the canonical field (``image``, ``mask``, ``width``,
``height``), before any model runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FieldError

# PIL format name -> MIME type: the only formats accepted as input.
INPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# diffusers' VaeImageProcessor default (``resample="lanczos"``, ``reducing_gap=None``).
RESAMPLE = Image.Resampling.LANCZOS


def _bad_image(field: str, template: str, **values) -> FieldError:
    return FieldError(422, "invalid_image", field, template, **values)


# -- decoding -------------------------------------------------------------------


def decode_base64(value: str, *, field: str, max_bytes: int) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL -> bytes, size-checked before decoding.

    >>> decode_base64("data:image/png;base64,iVBORw0KGgo=", field="image", max_bytes=1024)
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not isinstance(value, str) or not value.strip():
        raise _bad_image(field, "{field} must be a non-empty base64 string or data URL")
    payload = value.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _bad_image(field, "{field}: a data URL must look like data:image/png;base64,<data>")
        mime = header.removeprefix("data:").split(";")[0].lower()
        if mime and mime not in INPUT_FORMATS.values():
            raise _bad_image(
                field, "{field}: data URL type {mime!r} is not one of {accepted}", mime=mime, accepted=_accepted()
            )
    payload = "".join(payload.split())  # line breaks are common in pasted base64
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > max_bytes:
        raise _bad_image(field, "{field} is {size} bytes; the limit is {limit} bytes", size=size, limit=max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_image(field, "{field} is not valid base64 ({error})", error=e) from e
    if not data:
        raise _bad_image(field, "{field} is empty")
    return data


def _accepted() -> list[str]:
    return sorted(INPUT_FORMATS.values())


def load_image(
    data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image", invert: bool = False
) -> Image.Image:
    """File bytes -> an RGB ``PIL.Image``, refusing anything that is not a safe PNG, JPEG or WebP.

    Checked in this order, each before the work it guards: the byte count
    (``max_bytes``); the format, from the header; the pixel count, from the
    header (``max_pixels``; PIL's own decompression-bomb guard raises first for
    absurd sizes); then the full decode (a truncated or corrupt file fails
    here). The EXIF orientation is applied, as diffusers' ``load_image`` does,
    and any alpha channel is dropped (``convert("RGB")``). ``invert``: white <->
    black on the grayscale image, as A1111 inverts a mask (``inpainting_mask_invert``).
    """
    if len(data) > max_bytes:
        raise _bad_image(field, "{field} is {size} bytes; the limit is {limit} bytes", size=len(data), limit=max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bad_image(
            field, "{field} has too many pixels ({error}); the limit is {limit} pixels", error=e, limit=max_pixels
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _bad_image(field, "{field} is not a PNG, JPEG or WebP image") from e
    if image.format not in INPUT_FORMATS:
        raise _bad_image(field, "{field} is a {format} image; accepted: PNG, JPEG, WebP", format=image.format)
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise _bad_image(
            field,
            "{field} is {width}x{height} = {pixels} pixels; the limit is {limit} pixels",
            width=width,
            height=height,
            pixels=width * height,
            limit=max_pixels,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            if invert:
                return ImageOps.invert(image.convert("L")).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as e:
        raise _bad_image(
            field, "{field} could not be decoded: truncated or corrupt {format} ({error})", format=image.format, error=e
        ) from e


# -- size -------------------------------------------------------------------------


def resolve_size(
    image_size: tuple[int, int],
    width: int | None,
    height: int | None,
    *,
    multiple: int = 8,
    min_side: int = 64,
    max_side: int = 2048,
    max_setting: str = "limits.max_side",
) -> tuple[int, int]:
    """The output ``(width, height)`` for an input image of ``image_size`` ``(w, h)``.

    The rule: a side that is not given is the image's, rounded DOWN to a
    multiple of ``multiple`` (the VAE scale factor; diffusers'
    ``VaeImageProcessor.get_default_height_width``); a side that is given must
    be a multiple of it. Both must lie in ``[min_side, max_side]``. The image
    (and mask) are then resized to that size with Lanczos, as diffusers does;
    an image already at that size is left as it is.

    >>> resolve_size((517, 300), None, None)
    (512, 296)
    >>> resolve_size((517, 300), 256, 256)
    (256, 256)
    """
    bounds = {"multiple": multiple, "low": min_side, "high": max_side}
    sides = {}
    for name, given, own in (("width", width, image_size[0]), ("height", height, image_size[1])):
        if given is not None:
            check_side(name, given, multiple=multiple, min_side=min_side, max_side=max_side, max_setting=max_setting)
            sides[name] = given
            continue
        side = own - own % multiple
        if not min_side <= side <= max_side:
            raise _bad_image(
                "image",
                "{field} is {w}x{h}: its {side_name} rounded down to a multiple of {multiple} is {side}, outside "
                "[{low}, {high}]; give {f[width]} and {f[height]} to resize it",
                w=image_size[0],
                h=image_size[1],
                side_name=name,
                side=side,
                **bounds,
            )
        sides[name] = side
    return sides["width"], sides["height"]


def check_side(
    name: str, value: int, *, multiple: int, min_side: int, max_side: int, max_setting: str = "limits.max_side"
) -> None:
    """An output side (``width`` or ``height``): a multiple of ``multiple`` in ``[min_side, max_side]``.

    Outside the bounds the message names the setting at fault (``limits.min_side``, or ``max_setting``:
    ``limits.max_side``, or ``limits.max_side: auto for tiny-sdxl`` where the model sets it)."""
    if value % multiple or not min_side <= value <= max_side:
        setting = "limits.min_side" if value < min_side else max_setting if value > max_side else None
        raise FieldError(
            422,
            "invalid_value",
            name,
            "{field} must be a multiple of {multiple} in [{low}, {high}], got {value}"
            + (" ({setting})" if setting else ""),
            multiple=multiple,
            low=min_side,
            high=max_side,
            value=value,
            setting=setting,
        )


def check_mask_size(image: Image.Image, mask: Image.Image) -> None:
    """The mask must have the image's size (both as uploaded, before any resize)."""
    if mask.size != image.size:
        raise _bad_image(
            "mask",
            "{field} size {mw}x{mh} does not match {f[image]} size {iw}x{ih}",
            mw=mask.width,
            mh=mask.height,
            iw=image.width,
            ih=image.height,
        )


def resize_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at ``width`` x ``height``, resampled exactly as diffusers' ``VaeImageProcessor.resize``."""
    return image.resize((width, height), resample=RESAMPLE, reducing_gap=None)


# -- tensors ----------------------------------------------------------------------


def preprocess_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> ``[1, 3, height, width]`` float32 in [-1, 1], bit-identical to ``VaeImageProcessor.preprocess``.

    The result keeps diffusers' channels-last memory layout (``from_numpy`` of
    an HWC array), which the VAE's CPU convolutions are sensitive to.
    """
    pixels = np.array(resize_image(image, width, height)).astype(np.float32) / 255.0  # [H, W, 3]
    x = torch.from_numpy(np.stack([pixels]).transpose(0, 3, 1, 2))  # [1, 3, H, W]
    return 2.0 * x - 1.0


def preprocess_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask image -> ``[1, 1, height, width]`` float32 in {0, 1}: 1 (white) = repaint, 0 (black) = keep.

    As diffusers' inpainting ``mask_processor`` (resize, then grayscale, then
    ``binarize``: values >= 0.5 become 1, the rest 0).
    """
    gray = resize_image(mask, width, height).convert("L")
    m = np.stack([np.array(gray).astype(np.float32) / 255.0])[..., None]  # [1, H, W, 1]
    m = torch.from_numpy(m.transpose(0, 3, 1, 2))  # [1, 1, H, W]
    m[m < 0.5] = 0
    m[m >= 0.5] = 1
    return m


def original_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The input image as ``uint8`` ``[height, width, 3]``: what ``overlay_unmasked`` pastes back."""
    return np.array(resize_image(image, width, height).convert("RGB"))
