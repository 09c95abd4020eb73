"""Cheap progress previews: latents -> a small RGB PNG by one linear map, no VAE.

SD1.x latents are close to a linear function of the image at 1/8 resolution:
each latent pixel's 4 channels times a fixed 4x3 matrix (plus a bias) give
roughly its RGB in [-1, 1]. The factors below are the SD1.x "latent2rgb"
factors that ComfyUI previews with (``comfy/latent_formats.py``, ``SD15``; no
bias for SD1.x); A1111's "Approx cheap" preview uses the same idea. They were
fitted to SD1.x's trained VAE, so on another VAE (the random-weight
``builtin:tiny-sd``) the colours mean nothing, only the shapes and the
progress do.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# [latent_channels=4, rgb=3]
SD1_LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)
SD1_LATENT_RGB_BIAS = torch.zeros(3)


def latents_to_rgb(
    latents: torch.Tensor,
    factors: torch.Tensor = SD1_LATENT_RGB_FACTORS,
    bias: torch.Tensor = SD1_LATENT_RGB_BIAS,
) -> np.ndarray:
    """One image's latents ``[c, h, w]`` (the pipeline's scaled latent space) -> ``uint8 [h, w, 3]``.

    ``rgb = latents^T @ factors + bias`` per latent pixel, in [-1, 1], then mapped to
    [0, 255] as images are: ``(x + 1) / 2``, clamped, rounded.
    """
    if latents.ndim != 3 or latents.shape[0] != factors.shape[0]:
        raise ValueError(f"latents must be [{factors.shape[0]}, h, w], got {list(latents.shape)}")
    z = latents.detach().float().cpu().permute(1, 2, 0)  # [h, w, c]
    rgb = z @ factors.float() + bias.float()  # [h, w, 3]
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def preview_data_url(latents: torch.Tensor) -> str:
    """``[c, h, w]`` latents -> ``data:image/png;base64,...`` of the latent-resolution approximation."""
    buf = io.BytesIO()
    Image.fromarray(latents_to_rgb(latents), mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def unit_variance(x_t: torch.Tensor, scheduler, index: int) -> torch.Tensor:
    """``x_t`` at step ``index`` on the variance-preserving scale a preview expects.

    Sigma-parameterised schedulers (Euler: ``init_noise_sigma > 1``) carry
    ``x_t = x_0 + sigma * noise``; dividing by ``sqrt(sigma^2 + 1)`` is their own
    ``scale_model_input``. Others (DDIM, PNDM, DPM-Solver) already are on that scale.
    ``index`` counts the job's own timesteps; an img2img job's start in the schedule is
    the scheduler's ``begin_index``.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    index += getattr(scheduler, "begin_index", None) or 0
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0 or sigmas is None or index >= len(sigmas):
        return x_t
    sigma = float(sigmas[index])
    return x_t / (sigma**2 + 1) ** 0.5
