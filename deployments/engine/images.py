"""VAE decode and image encoding (PNG, JPEG, WebP)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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
