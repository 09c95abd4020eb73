"""Image inputs for img2img and inpainting: decode safely, preprocess as diffusers does, encode.

The path of an uploaded image, top to bottom:

1. ``decode_base64`` (base64 or a data URL) and ``load_image``: PNG, JPEG or
   WebP only, a byte cap before decoding and a pixel cap read from the header
   before the pixels are decoded (decompression bombs), RGB out.
2. ``resolve_size``: the output size (see its rule) and ``check_mask_size``.
3. ``preprocess_image`` / ``preprocess_mask``: tensors exactly as diffusers'
   ``VaeImageProcessor.preprocess`` makes them (Lanczos resize, [-1, 1]; the
   mask binarised to {0, 1}, white = repaint).
4. ``encode_conditioning`` (the VAE stage): VAE-encodes, draws the initial
   noise, and returns one ``ImageConditioning`` per output image for the
   denoiser (``DenoiseRequest.conditioning``).
5. ``overlay_unmasked``: pastes the input's pixels back where the mask keeps them.

Every check raises ``ImageInputError(field, message)`` before any model runs.

Generator convention (what makes a served image equal diffusers'): image ``k``
of a request has its own CPU generator seeded ``seed + k``. The VAE stage makes
every draw diffusers' pipelines make before their denoise loop, in their order,

- img2img: init-image latents (``latent_dist.sample``), then the noise;
- inpaint, 4-channel UNet: init-image latents, the noise, then the masked
  image's latents (never used by a 4-channel UNet, so only its ``randn`` draw
  is made: diffusers samples it all the same);
- inpaint, 9-channel UNet: init-image latents (only if strength < 1), the
  noise, then the masked image's latents,

and hands the denoiser the noise and the generator's state after the last
draw (``ImageConditioning.generator_state``): the denoiser's scheduler steps
(Euler ancestral, DDPM-like) then draw exactly what diffusers' would.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .images import latent_dist, sample_latents

# PIL format name -> MIME type: the only formats accepted as input.
INPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# diffusers' VaeImageProcessor default (``resample="lanczos"``, ``reducing_gap=None``).
RESAMPLE = Image.Resampling.LANCZOS


class ImageInputError(ValueError):
    """A bad image-conditioning input (image, mask, size or strength): the client's fault, a 400.

    ``field`` names the request field (``"image"``, ``"mask"``, ``"strength"``,
    ``"width"``, ``"height"``); the message names the limit that was broken.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # crosses process boundaries through Ray
        return type(self), (self.field, self.message)


# -- decoding -------------------------------------------------------------------


def decode_base64(value: str, *, field: str, max_bytes: int) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL -> bytes, size-checked before decoding.

    >>> decode_base64("data:image/png;base64,iVBORw0KGgo=", field="image", max_bytes=1024)
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not isinstance(value, str) or not value.strip():
        raise ImageInputError(field, "must be a non-empty base64 string or data URL")
    payload = value.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageInputError(field, "a data URL must look like data:image/png;base64,<data>")
        mime = header.removeprefix("data:").split(";")[0].lower()
        if mime and mime not in INPUT_FORMATS.values():
            raise ImageInputError(field, f"data URL type {mime!r} is not one of {sorted(INPUT_FORMATS.values())}")
    payload = "".join(payload.split())  # line breaks are common in pasted base64
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > max_bytes:
        raise ImageInputError(field, f"is {size} bytes; the limit is {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(field, f"is not valid base64 ({e})") from e
    if not data:
        raise ImageInputError(field, "is empty")
    return data


def load_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """File bytes -> an RGB ``PIL.Image``, refusing anything that is not a safe PNG, JPEG or WebP.

    Checked in this order, each before the work it guards: the byte count
    (``max_bytes``); the format, from the header; the pixel count, from the
    header (``max_pixels``; PIL's own decompression-bomb guard raises first for
    absurd sizes); then the full decode (a truncated or corrupt file fails
    here). The EXIF orientation is applied, as diffusers' ``load_image`` does,
    and any alpha channel is dropped (``convert("RGB")``).
    """
    if len(data) > max_bytes:
        raise ImageInputError(field, f"is {len(data)} bytes; the limit is {max_bytes} bytes")
    pixel_limit = f"the limit is {max_pixels} pixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(field, f"has too many pixels ({e}); {pixel_limit}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(field, "is not a PNG, JPEG or WebP image") from e
    if image.format not in INPUT_FORMATS:
        raise ImageInputError(field, f"is a {image.format} image; accepted: PNG, JPEG, WebP")
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageInputError(field, f"is {width}x{height} = {width * height} pixels; {pixel_limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(field, f"could not be decoded: truncated or corrupt {image.format} ({e})") from e


# -- size -------------------------------------------------------------------------


def resolve_size(
    image_size: tuple[int, int],
    width: int | None,
    height: int | None,
    *,
    multiple: int = 8,
    min_side: int = 64,
    max_side: int = 2048,
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
    sides = {}
    for name, given, own in (("width", width, image_size[0]), ("height", height, image_size[1])):
        if given is not None:
            if given % multiple or not min_side <= given <= max_side:
                raise ImageInputError(
                    name, f"must be a multiple of {multiple} in [{min_side}, {max_side}], got {given}"
                )
            sides[name] = given
            continue
        side = own - own % multiple
        if not min_side <= side <= max_side:
            raise ImageInputError(
                "image",
                f"image is {image_size[0]}x{image_size[1]}: its {name} rounded down to a multiple of {multiple} "
                f"is {side}, outside [{min_side}, {max_side}]; give width and height to resize it",
            )
        sides[name] = side
    return sides["width"], sides["height"]


def check_mask_size(image: Image.Image, mask: Image.Image) -> None:
    """The mask must have the image's size (both as uploaded, before any resize)."""
    if mask.size != image.size:
        raise ImageInputError(
            "mask", f"mask size {mask.width}x{mask.height} does not match image size {image.width}x{image.height}"
        )


def check_strength(strength: float, steps: int | None = None) -> None:
    """``strength`` must lie in (0, 1]; with ``steps``, at least one denoising step must remain.

    img2img and inpainting run ``int(steps * strength)`` of the ``steps``
    timesteps (diffusers' ``get_timesteps``), so e.g. strength 0.1 with 5 steps
    would run none.
    """
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ImageInputError("strength", f"must be in the interval (0, 1], got {strength!r}")
    if steps is not None and int(steps * strength) < 1:
        raise ImageInputError(
            "strength", f"strength {strength} with {steps} steps runs no step; need strength >= 1/steps = {1 / steps:g}"
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


def latent_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Pixel mask ``[1, 1, H, W]`` -> latent-size mask ``[1, 1, H/s, W/s]`` (nearest, as ``prepare_mask_latents``)."""
    h, w = mask.shape[-2:]
    return F.interpolate(mask, size=(h // vae_scale_factor, w // vae_scale_factor))


def original_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The input image as ``uint8`` ``[height, width, 3]``: what ``overlay_unmasked`` pastes back."""
    return np.array(resize_image(image, width, height).convert("RGB"))


def overlay_unmasked(original: np.ndarray, generated: np.ndarray, mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Paste ``original`` pixels where ``mask`` is 0 (keep): unmasked pixels come out exactly as they went in.

    ``original`` and ``generated``: ``uint8`` ``[H, W, 3]``; ``mask``: ``[1, 1, H, W]``
    or ``[H, W]`` in {0, 1} (``preprocess_mask``). The VAE cannot reproduce
    pixels exactly, so without this the kept region drifts slightly.
    """
    m = np.asarray(mask).reshape(mask.shape[-2:])
    if original.shape != generated.shape or original.shape[:2] != m.shape:
        raise ValueError(f"shapes differ: original {original.shape}, generated {generated.shape}, mask {m.shape}")
    return np.where((m == 0)[..., None], original, generated).astype(np.uint8)


# -- the VAE stage ------------------------------------------------------------------


@dataclass
class ConditioningInput:
    """One request's image input after ``preprocess_*``: what the VAE stage encodes."""

    image: torch.Tensor  # [1, 3, H, W] in [-1, 1] (preprocess_image)
    seeds: list[int]  # one per output image: seed + k
    strength: float  # (0, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W] in {0, 1}, 1 = repaint (preprocess_mask); None: img2img


@dataclass
class ImageConditioning:
    """What the denoiser needs for one image-conditioned image. CPU tensors; travels through Ray.

    ``mask`` set: inpainting (``StableDiffusionInpaintPipeline``); else img2img
    (``StableDiffusionImg2ImgPipeline``).
    """

    strength: float
    noise: torch.Tensor  # [1, 4, h, w] the initial noise, drawn from the image's generator
    generator_state: torch.Tensor  # uint8: the CPU generator's state after every draw before the loop
    image_latents: torch.Tensor | None = None  # [1, 4, h, w] the init image, sampled and scaled
    mask: torch.Tensor | None = None  # [1, 1, h, w] latent-size, 1 = repaint
    masked_image_latents: torch.Tensor | None = None  # [1, 4, h, w] (9-channel UNets only)

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


@torch.inference_mode()
def encode_conditioning(
    vae: torch.nn.Module,
    inputs: list[ConditioningInput],
    *,
    unet_in_channels: int,
    noise_dtype: torch.dtype,
    per_image: bool = False,
) -> list[list[ImageConditioning]]:
    """VAE-encode each request's image (and masked image) and make each output image's draws.

    Returns, per input, one ``ImageConditioning`` per seed. ``noise_dtype`` is
    the denoiser's dtype (diffusers draws the noise in the prompt embeddings'
    dtype). ``unet_in_channels`` (``ModelInfo.unet_in_channels``) decides what
    is encoded: a 9-channel UNet reads the masked image's latents; for it an
    img2img input (no mask) becomes inpainting with an all-white mask, i.e.
    diffusers' inpainting pipeline with ``mask_image`` all white (the
    whole image is repainted, guided by the masked image, which is then all zero).
    See the module docstring for the generator convention.
    The VAE forwards run first, batched when ``per_image`` is false (one per
    image otherwise, for batch invariance); the draws are per image.
    """
    if unet_in_channels not in (4, 9):
        raise ValueError(f"the UNet must have 4 or 9 input channels, not {unet_in_channels}")
    cfg = vae.config
    s = 2 ** (len(cfg.block_out_channels) - 1)
    vae_dtype = next(vae.parameters()).dtype
    plans = []
    to_encode: list[torch.Tensor] = []  # images for the VAE, each [1, 3, H, W]
    for inp in inputs:
        check_strength(inp.strength)
        if inp.image.ndim != 4 or inp.image.shape[:2] != (1, 3):
            raise ValueError(f"image must be [1, 3, H, W], got {list(inp.image.shape)}")
        height, width = inp.image.shape[-2:]
        if height % s or width % s:
            raise ImageInputError("image", f"size {width}x{height} is not a multiple of {s}; use resolve_size")
        mask = inp.mask
        if mask is None and unet_in_channels == 9:
            mask = torch.ones(1, 1, height, width)
        if mask is not None and tuple(mask.shape) != (1, 1, height, width):
            raise ImageInputError("mask", f"mask must be [1, 1, {height}, {width}], got {list(mask.shape)}")
        plan = {"input": inp, "mask": mask, "image_row": None, "masked_row": None}
        # diffusers' inpainting encodes the init image only when it needs it: for a 4-channel UNet's
        # blending, or to start from it (strength < 1).
        if mask is None or unet_in_channels == 4 or inp.strength < 1.0:
            plan["image_row"] = len(to_encode)
            to_encode.append(inp.image)
        if mask is not None and unet_in_channels == 9:
            plan["masked_row"] = len(to_encode)
            to_encode.append(inp.image * (mask < 0.5))
        plans.append(plan)
    dists = _encode_grouped(vae, to_encode, per_image)
    out = []
    for plan in plans:
        inp, mask = plan["input"], plan["mask"]
        height, width = inp.image.shape[-2:]
        shape = (1, cfg.latent_channels, height // s, width // s)
        mask_latent = latent_mask(mask, s) if mask is not None else None
        images = []
        for seed in inp.seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            image_latents = masked_latents = None
            if plan["image_row"] is not None:
                image_latents = sample_latents(*dists[plan["image_row"]], generator, cfg.scaling_factor).cpu()
            noise = torch.randn(shape, generator=generator, dtype=noise_dtype)
            if plan["masked_row"] is not None:
                masked_latents = sample_latents(*dists[plan["masked_row"]], generator, cfg.scaling_factor).cpu()
            elif mask is not None:
                # A 4-channel UNet never reads the masked image, but diffusers samples its latents:
                # the same randn keeps the generator where diffusers' is.
                torch.randn(shape, generator=generator, dtype=vae_dtype)
            images.append(
                ImageConditioning(
                    strength=float(inp.strength),
                    noise=noise,
                    generator_state=generator.get_state(),
                    image_latents=image_latents,
                    mask=mask_latent,
                    masked_image_latents=masked_latents,
                )
            )
        out.append(images)
    return out


def _encode_grouped(vae, images: list[torch.Tensor], per_image: bool) -> list[tuple]:
    """``latent_dist`` for each image, one VAE call per shape (or per image): ``[(dist, row), ...]``."""
    result: list[tuple | None] = [None] * len(images)
    shapes: dict[tuple, list[int]] = {}
    for i, x in enumerate(images):
        shapes.setdefault(tuple(x.shape), []).append(i)
    for idx in shapes.values():
        dist = latent_dist(vae, torch.cat([images[i] for i in idx]), per_image)
        for row, i in enumerate(idx):
            result[i] = (dist, row)
    return result  # type: ignore[return-value]
