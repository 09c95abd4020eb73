"""Image conditioning for img2img and inpainting, from tensors: VAE-encode, draw the noise, paste back.

The ingress decodes and checks uploads and makes the tensors (``graph/image_decoding.py``:
base64, formats, pixel caps, the output size, diffusers' ``VaeImageProcessor.preprocess``); this
module starts from those tensors (``ConditioningInput``):

1. ``encode_conditioning`` (the VAE stage): VAE-encodes, draws the initial
   noise, and returns one ``ImageConditioning`` per output image for the
   denoiser (``DenoiseRequest.conditioning``).
2. ``overlay_unmasked`` (after decoding): pastes the input's pixels back where the mask keeps them.

Inputs that would break the engine (a strength outside (0, 1], tensors of the wrong shape) raise
``ImageInputError(field, message)`` before any model runs; the ingress has refused them already.

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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import latent_dist, sample_latents


class ImageInputError(ValueError):
    """A bad image-conditioning input (image, mask or strength): the client's fault, a 422.

    ``field`` names the request field (``"image"``, ``"mask"``, ``"strength"``);
    the message names the limit that was broken.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # crosses process boundaries through Ray
        return type(self), (self.field, self.message)


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


# -- tensors ----------------------------------------------------------------------


def latent_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Pixel mask ``[1, 1, H, W]`` -> latent-size mask ``[1, 1, H/s, W/s]`` (nearest, as ``prepare_mask_latents``)."""
    h, w = mask.shape[-2:]
    return F.interpolate(mask, size=(h // vae_scale_factor, w // vae_scale_factor))


def overlay_unmasked(original: np.ndarray, generated: np.ndarray, mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Paste ``original`` pixels where ``mask`` is 0 (keep): unmasked pixels come out exactly as they went in.

    ``original`` and ``generated``: ``uint8`` ``[H, W, 3]``; ``mask``: ``[1, 1, H, W]``
    or ``[H, W]`` in {0, 1} (1 = repaint). The VAE cannot reproduce
    pixels exactly, so without this the kept region drifts slightly.
    """
    m = np.asarray(mask).reshape(mask.shape[-2:])
    if original.shape != generated.shape or original.shape[:2] != m.shape:
        raise ValueError(f"shapes differ: original {original.shape}, generated {generated.shape}, mask {m.shape}")
    return np.where((m == 0)[..., None], original, generated).astype(np.uint8)


# -- the VAE stage ------------------------------------------------------------------


@dataclass
class ConditioningInput:
    """One request's image input, preprocessed by the ingress: what the VAE stage encodes."""

    image: torch.Tensor  # [1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor.preprocess
    seeds: list[int]  # one per output image: seed + k
    strength: float  # (0, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W] in {0, 1}, 1 = repaint; None: img2img


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
            raise ImageInputError("image", f"size {width}x{height} is not a multiple of {s}")
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
