"""VAE encode and decode, and image file encoding (PNG, JPEG, WebP)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@torch.inference_mode()
def latent_dist(vae: torch.nn.Module, images: torch.Tensor, per_image: bool = False):
    """Images ``[n, 3, H, W]`` in [-1, 1] -> the VAE's ``DiagonalGaussianDistribution`` over ``[n, 4, h, w]``.

    The VAE forward alone, with no randomness: the same for every seed, so a
    request's image is encoded once however many images it asks for.
    ``per_image`` encodes one image per call (batch invariance, as ``decode``).
    Images are given the channels-last layout ``VaeImageProcessor.preprocess``
    produces (``torch.from_numpy`` of an HWC array), because CPU convolutions
    round differently for other layouts and diffusers' latents would differ.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    param = next(vae.parameters())
    x = images.to(param.device, param.dtype).contiguous(memory_format=torch.channels_last)
    if per_image:
        moments = torch.cat([vae.encode(x[i : i + 1]).latent_dist.parameters for i in range(x.shape[0])])
    else:
        moments = vae.encode(x).latent_dist.parameters  # [n, 2 * 4, h, w]: mean and log-variance
    return DiagonalGaussianDistribution(moments)


def sample_latents(dist, index: int, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """Row ``index`` of ``dist`` sampled with ``generator`` and scaled: ``[1, 4, h, w]``.

    Exactly diffusers' ``scaling_factor * retrieve_latents(vae.encode(image), generator)``
    (``sample_mode="sample"``): one ``randn`` of the latent shape from ``generator``.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    row = DiagonalGaussianDistribution(dist.parameters[index : index + 1])
    return scaling_factor * row.sample(generator)


@torch.inference_mode()
def encode(
    vae: torch.nn.Module, images: torch.Tensor, generators: list[torch.Generator], per_image: bool = False
) -> torch.Tensor:
    """Images ``[n, 3, H, W]`` in [-1, 1] -> latents ``[n, 4, h, w]``, sampled and scaled.

    Image ``i`` is sampled with ``generators[i]`` (one ``randn`` draw each), as
    diffusers' img2img pipeline does with a list of generators; the result is
    multiplied by the VAE's ``scaling_factor``.

    >>> latents = encode(vae, preprocess_image(img, 512, 512), [torch.Generator().manual_seed(7)])  # doctest: +SKIP
    """
    if images.shape[0] != len(generators):
        raise ValueError(f"one generator per image: {images.shape[0]} images, {len(generators)} generators")
    dist = latent_dist(vae, images, per_image)
    return torch.cat([sample_latents(dist, i, g, vae.config.scaling_factor) for i, g in enumerate(generators)])


@torch.inference_mode()
def decode(vae: torch.nn.Module, latents: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Latents ``[n, c, h, w]`` -> float images ``[n, 3, H, W]`` in [0, 1].

    The same arithmetic as ``StableDiffusionPipeline``: divide by the VAE's
    scaling factor, decode, then ``VaeImageProcessor.postprocess``'s
    ``(x / 2 + 0.5).clamp(0, 1)``. ``per_image`` decodes one image per call,
    so an image's pixels never depend on its batch-mates (CPU convolutions
    round differently for different batch sizes).
    """
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor
    if per_image:
        x = torch.cat([vae.decode(z_i[None], return_dict=False)[0] for z_i in z])
    else:
        x = vae.decode(z, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1).float().cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``[n, 3, H, W]`` in [0, 1] -> ``uint8`` ``[n, H, W, 3]``, rounded as diffusers' ``numpy_to_pil``."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")


def encode_image(pixels: np.ndarray, output_format: str, quality: int = 95) -> bytes:
    """One ``uint8`` ``[H, W, 3]`` image -> file bytes. PNG and lossless WebP round-trip exactly."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    buf = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if output_format == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buf, format="WEBP", lossless=True)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()
