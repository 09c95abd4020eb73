"""VAE encode and decode, and image file encoding (PNG, JPEG, WebP).

The arithmetic around the VAE is diffusers' SD and SDXL pipelines': latents are scaled by the VAE
config's ``scaling_factor`` and, where the config has them (SDXL-family VAEs such as Playground
v2.5's), normalised by ``latents_mean``/``latents_std``. ``TilingVAE`` adds diffusers' tiled decode
and encode above a configured size, per call, without touching the shared model.
"""

from __future__ import annotations

import copy
import io
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class VAELike(Protocol):
    """What this module needs of a VAE: diffusers' ``AutoencoderKL`` or a ``TilingVAE`` around one."""

    config: Any

    def parameters(self): ...

    def encode(self, x: torch.Tensor, return_dict: bool = True): ...

    def decode(self, z: torch.Tensor, return_dict: bool = True): ...


# -- latent scaling (SD: scaling_factor; SDXL family: also latents_mean / latents_std) ---------------


def latent_normalization(config, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(latents_mean, latents_std)`` ``[1, c, 1, 1]`` from a VAE config that has both, else None.

    diffusers' SDXL pipelines apply them only when both are set (``has_latents_mean and
    has_latents_std``); SD1.x and SDXL's own VAE have neither and scale by ``scaling_factor`` alone.
    """
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, channels, 1, 1), torch.tensor(std).view(1, channels, 1, 1)


def scale_latents(z: torch.Tensor, config) -> torch.Tensor:
    """A VAE posterior sample ``[n, c, h, w]`` -> the denoiser's latents.

    As ``StableDiffusionXLImg2ImgPipeline.prepare_latents``: ``(z - latents_mean) * scaling_factor /
    latents_std`` where the config has both, else ``scaling_factor * z``, in ``z``'s dtype.
    """
    norm = latent_normalization(config, z.shape[1])
    if norm is None:
        return config.scaling_factor * z
    mean, std = (t.to(z.device, z.dtype) for t in norm)
    return (z - mean) * config.scaling_factor / std


def unscale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """The denoiser's latents ``[n, c, h, w]`` -> the VAE decoder's input (``StableDiffusionXLPipeline.__call__``).

    ``latents * latents_std / scaling_factor + latents_mean`` where the config has both, else
    ``latents / scaling_factor``, in ``latents``' dtype: the inverse of ``scale_latents``.
    """
    norm = latent_normalization(config, latents.shape[1])
    if norm is None:
        return latents / config.scaling_factor
    mean, std = (t.to(latents.device, latents.dtype) for t in norm)
    return latents * std / config.scaling_factor + mean


# -- tiling -------------------------------------------------------------------------------------------


def tile_size_px(vae: VAELike) -> int:
    """The side of diffusers' VAE tile in pixels: the config's ``sample_size`` (``tile_sample_min_size``)."""
    size = vae.config.sample_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"VAE tiling needs an int sample_size in the VAE config, got {size!r}")
    return size


def tiling_view(vae: torch.nn.Module) -> torch.nn.Module:
    """A second handle on ``vae``, with diffusers' ``enable_tiling()`` on; ``vae`` itself is left untouched.

    Why a copy: diffusers' ``AutoencoderKL.encode``/``decode`` tile when the plain attribute ``use_tiling``
    is set; toggling it on the shared VAE per request would race, since the VAE deployment encodes
    and decodes in concurrent threads. ``copy.copy`` of an ``nn.Module`` copies only its attribute
    dict: submodules, parameters and the tile sizes are the very same objects (no memory, and any
    later ``.to()`` of ``vae`` is seen), and only the view's ``use_tiling`` differs. So a call on the
    view runs exactly diffusers' ``tiled_decode``/``_tiled_encode`` with ``tile_overlap_factor``
    0.25 and ``blend_v``/``blend_h``, where and as ``vae.enable_tiling()`` would. The one reliance
    on diffusers' internals (``use_tiling`` read per call) is pinned in ``tests/test_vae_tiling.py``.
    """
    view = copy.copy(vae)
    view.enable_tiling()
    if getattr(vae, "use_tiling", None) is not False or view.encoder is not vae.encoder:
        raise RuntimeError("tiling_view: the VAE's use_tiling changed, or its modules were copied (diffusers changed)")
    return view


class TilingVAE:
    """The served VAE: diffusers' ``AutoencoderKL``, tiled (``enable_tiling``) for images above a size.

    Why: a VAE's activations grow with the image (the decoder's last blocks hold 128-512 channels
    at full resolution), so at 1024-2048 px one decode takes gigabytes. In tiles of
    ``tile_size_px`` (the VAE's ``sample_size``) the activations stay those of one tile.

    ``tile_above_px``: an image whose larger side exceeds it is encoded or decoded in tiles; ``"auto"``
    is ``tile_size_px``, i.e. exactly the images diffusers' ``enable_tiling()`` tiles; None or 0: never.
    A threshold below ``tile_size_px`` acts as ``tile_size_px`` (an image within one tile is never
    tiled, as in diffusers); one above it leaves the images between the two untiled, where diffusers
    with ``enable_tiling()`` would tile them: the one place this differs from diffusers. A tiled image
    equals diffusers' ``vae.enable_tiling()`` output bit for bit; it differs slightly from an untiled
    decode (each tile sees only its neighbourhood, and overlaps are blended).

    Calls are thread-safe: nothing is mutated per call (see ``tiling_view``).

    >>> vae = TilingVAE(models.load_vae(directory, device, dtype), "auto")  # doctest: +SKIP
    >>> decode(vae, latents)  # [n, 3, H, W]; tiled where H or W > sample_size  # doctest: +SKIP
    """

    def __init__(self, vae: torch.nn.Module, tile_above_px: int | Literal["auto"] | None = "auto"):
        self.vae = vae
        self.config = vae.config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if tile_above_px == "auto":
            tile_above_px = tile_size_px(vae)
        if tile_above_px is not None and (isinstance(tile_above_px, bool) or tile_above_px < 0):
            raise ValueError(f"tile_above_px must be an int >= 0, 'auto' or None, got {tile_above_px!r}")
        self.tile_above_px: int | None = tile_above_px if tile_above_px else None  # 0 means never, as None
        self.tile_px = tile_size_px(vae) if self.tile_above_px is not None else None
        self._tiled = tiling_view(vae) if self.tile_above_px is not None else None

    def tiles(self, height_px: int, width_px: int) -> bool:
        """Whether an image of ``height_px`` x ``width_px`` is encoded and decoded in tiles."""
        if self.tile_above_px is None:
            return False
        side = max(height_px, width_px)
        return side > self.tile_above_px and side > self.tile_px

    def parameters(self):
        return self.vae.parameters()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``AutoencoderKL.encode`` of images ``[n, 3, H, W]``, tiled if ``tiles(H, W)``."""
        vae = self._tiled if self.tiles(*x.shape[-2:]) else self.vae
        return vae.encode(x, return_dict=return_dict)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """``AutoencoderKL.decode`` of latents ``[n, c, h, w]``, tiled if ``tiles(h * s, w * s)``."""
        s = self.vae_scale_factor
        vae = self._tiled if self.tiles(z.shape[-2] * s, z.shape[-1] * s) else self.vae
        return vae.decode(z, return_dict=return_dict)


# -- encode and decode ----------------------------------------------------------------------------------


class LatentDist:
    """The VAE's posterior (diffusers' ``DiagonalGaussianDistribution``) over a batch, with its VAE config.

    ``sample_latents`` needs the config's latent scaling (``scaling_factor``, and ``latents_mean``/
    ``latents_std`` where set) to map a sample into the denoiser's latent space, so it travels with
    the distribution rather than through every caller.
    """

    def __init__(self, parameters: torch.Tensor, config):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        self.dist = DiagonalGaussianDistribution(parameters)  # parameters: [n, 2 * c, h, w]
        self.config = config

    @property
    def parameters(self) -> torch.Tensor:
        return self.dist.parameters  # [n, 2 * c, h, w]: mean and log-variance

    @property
    def mean(self) -> torch.Tensor:
        return self.dist.mean  # [n, c, h, w]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.dist.sample(generator)  # [n, c, h, w], unscaled


@torch.inference_mode()
def latent_dist(vae: VAELike, images: torch.Tensor, per_image: bool = False) -> LatentDist:
    """Images ``[n, 3, H, W]`` in [-1, 1] -> the VAE's posterior over ``[n, c, h, w]`` latents.

    The VAE forward alone, with no randomness: the same for every seed, so a
    request's image is encoded once however many images it asks for.
    ``per_image`` encodes one image per call (batch invariance, as ``decode``).
    Images are cast to the VAE's dtype (float32 where ``force_upcast`` kept it so on a float16
    server, as diffusers' SDXL img2img does with ``image.float()``) and given the channels-last
    layout ``VaeImageProcessor.preprocess`` produces (``torch.from_numpy`` of an HWC array),
    because CPU convolutions round differently for other layouts and diffusers' latents would differ.
    A ``TilingVAE`` encodes large images in tiles.
    """
    param = next(vae.parameters())
    x = images.to(param.device, param.dtype).contiguous(memory_format=torch.channels_last)
    if per_image:
        moments = torch.cat([vae.encode(x[i : i + 1]).latent_dist.parameters for i in range(x.shape[0])])
    else:
        moments = vae.encode(x).latent_dist.parameters  # [n, 2 * c, h, w]: mean and log-variance
    return LatentDist(moments, vae.config)


def sample_latents(dist: LatentDist, index: int, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """Row ``index`` of ``dist`` sampled with ``generator`` and scaled: ``[1, c, h, w]``.

    Exactly diffusers' ``scale(retrieve_latents(vae.encode(image), generator))``
    (``sample_mode="sample"``): one ``randn`` of the latent shape from ``generator``, then
    ``scale_latents`` with ``scaling_factor`` (the VAE config's; a caller passes it explicitly)
    and the config's ``latents_mean``/``latents_std`` where set, as ``StableDiffusionXLImg2ImgPipeline``.
    (diffusers' SDXL inpainting pipeline scales by ``scaling_factor`` alone when it encodes, though
    it decodes with the normalisation; here encode and decode are always each other's inverse.)
    """
    if scaling_factor != dist.config.scaling_factor:
        raise ValueError(f"scaling_factor {scaling_factor} is not the VAE's {dist.config.scaling_factor}")
    row = LatentDist(dist.parameters[index : index + 1], dist.config)
    return scale_latents(row.sample(generator), dist.config)


@torch.inference_mode()
def encode(
    vae: VAELike, images: torch.Tensor, generators: list[torch.Generator], per_image: bool = False
) -> torch.Tensor:
    """Images ``[n, 3, H, W]`` in [-1, 1] -> latents ``[n, c, h, w]``, sampled and scaled.

    Image ``i`` is sampled with ``generators[i]`` (one ``randn`` draw each), as
    diffusers' img2img pipeline does with a list of generators; the result is
    scaled as the VAE's config says (``scale_latents``).

    >>> latents = encode(vae, preprocess_image(img, 512, 512), [torch.Generator().manual_seed(7)])  # doctest: +SKIP
    """
    if images.shape[0] != len(generators):
        raise ValueError(f"one generator per image: {images.shape[0]} images, {len(generators)} generators")
    dist = latent_dist(vae, images, per_image)
    return torch.cat([sample_latents(dist, i, g, vae.config.scaling_factor) for i, g in enumerate(generators)])


@torch.inference_mode()
def decode(vae: VAELike, latents: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Latents ``[n, c, h, w]`` -> float32 images ``[n, 3, H, W]`` in [0, 1].

    The same arithmetic as ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``: cast the
    latents to the VAE's dtype (float32 where ``force_upcast`` kept the VAE so on a float16 server:
    SDXL's VAE overflows in float16), undo the scaling (``unscale_latents``), decode, then
    ``VaeImageProcessor.postprocess``'s ``(x / 2 + 0.5).clamp(0, 1)``. ``per_image`` decodes one
    image per call, so an image's pixels never depend on its batch-mates (CPU convolutions round
    differently for different batch sizes). A ``TilingVAE`` decodes large images in tiles.
    """
    param = next(vae.parameters())
    z = unscale_latents(latents.to(param.device, param.dtype), vae.config)  # [n, c, h, w]
    if per_image:
        x = torch.cat([vae.decode(z_i[None], return_dict=False)[0] for z_i in z])
    else:
        x = vae.decode(z, return_dict=False)[0]  # [n, 3, H, W] in about [-1, 1]
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
