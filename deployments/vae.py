"""VAE deployment: batched latent decoding and image-file encoding (PNG, JPEG, WebP), and batched
image encoding into latents for img2img and inpainting."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from .config import VAEConfig
from .engine import models
from .engine.conditioning import ConditioningInput, ImageConditioning, encode_conditioning, overlay_unmasked
from .engine.config import ModelConfig
from .engine.fair_batcher import FairBatcher
from .engine.images import TilingVAE, decode, encode_image, to_uint8
from .engine.runtime import prepare_runtime
from .messages import DecodedImages, DecodeParams, Denoised


@serve.deployment(name="VAE")
class VAE:
    def __init__(self, model: ModelConfig, config: VAEConfig, tenant_weights: dict[str, float] | None = None):
        """``tenant_weights``: the fair-share weights (``denoiser.tenant_weights``, as ``build_app`` passes them)."""
        rt = prepare_runtime(model)
        # float32 where the VAE's config says force_upcast, even on a float16 server (load_vae); decode and
        # encode cast to its dtype. Tiled (diffusers' enable_tiling) above config.tile_above_px, per call.
        self.vae = TilingVAE(models.load_vae(rt.info.directory, rt.device, rt.dtype), config.tile_above_px)
        self.per_image = rt.deterministic
        self.unet_in_channels = rt.info.unet_in_channels
        self.noise_dtype = rt.dtype
        self.encoded_images = 0
        # Batches across requests, filled tenant by tenant in weighted-fair order (engine/fair_batcher.py).
        self.encoder = FairBatcher(
            self._encode_batch, config.max_batch_size, config.batch_wait_timeout_s, tenant_weights
        )
        self.decoder = FairBatcher(
            self._decode_batch, config.max_batch_size, config.batch_wait_timeout_s, tenant_weights
        )

    async def encode(
        self, conditioning: ConditioningInput, tenant: str = "anonymous", tenant_weight: float | None = None
    ) -> list[ImageConditioning]:
        """img2img / inpainting: VAE-encode a request's image (and masked image) and draw each output
        image's noise, as diffusers' pipelines do (``engine/conditioning.py``); one entry per seed.
        ``tenant``: whose request it is (the batch's fair order); ``tenant_weight``: its key's weight, if any."""
        return await self.encoder.submit(tenant, conditioning, weight=tenant_weight)

    async def _encode_batch(self, inputs: list[ConditioningInput]) -> list[list[ImageConditioning]]:
        self.encoded_images += len(inputs)
        return await asyncio.to_thread(
            encode_conditioning,
            self.vae,
            inputs,
            unet_in_channels=self.unet_in_channels,
            noise_dtype=self.noise_dtype,
            per_image=self.per_image,
        )

    async def decode(self, denoised: Denoised, params: DecodeParams) -> DecodedImages:
        """Decode a request's latents and encode each image; passes the earlier stages' timings on.

        ``params.overlay`` (inpainting with ``preserve_unmasked``): the original's pixels are pasted
        back where the mask is 0, so they come out exactly as sent.
        """
        start = time.perf_counter()
        # [n, 3, H, W] in [0, 1]; a request's cost in the fair order is its number of images
        images, waited_ms = await self.decoder.submit_timed(
            params.tenant, denoised.latents, cost=denoised.latents.shape[0], weight=params.tenant_weight
        )
        pixels = to_uint8(images)  # [n, H, W, 3]
        if params.overlay is not None:
            pixels = [overlay_unmasked(params.overlay.original, p, params.overlay.mask) for p in pixels]
        files = await asyncio.to_thread(lambda: [encode_image(p, params.output_format) for p in pixels])
        return DecodedImages(
            images=tuple(files),
            encode_ms=denoised.encode_ms,
            queue_ms=denoised.queue_ms,
            denoise_ms=denoised.denoise_ms,
            decode_ms=1000.0 * (time.perf_counter() - start),
            trace=denoised.trace,
            encode_wait_ms=denoised.encode_wait_ms,
            decode_wait_ms=waited_ms,
            step_ms=denoised.step_ms,
        )

    async def _decode_batch(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        # Requests of one shape share a decode; each request may carry several images.
        return await asyncio.to_thread(self._decode_grouped, latents)

    def _decode_grouped(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(latents)
        shapes: dict[tuple, list[int]] = {}
        for i, z in enumerate(latents):
            shapes.setdefault(tuple(z.shape[1:]), []).append(i)
        for idx in shapes.values():
            images = decode(self.vae, torch.cat([latents[i] for i in idx]), per_image=self.per_image)
            for i, chunk in zip(idx, images.split([latents[i].shape[0] for i in idx]), strict=True):
                out[i] = chunk
        return out  # type: ignore[return-value]

    def stats(self) -> dict:
        return {
            "encoded_images": self.encoded_images,
            "batches": {"encode": self.encoder.batches, "decode": self.decoder.batches},
            "waiting_by_tenant": {"encode": self.encoder.depths(), "decode": self.decoder.depths()},
        }

    def ready(self) -> bool:
        return True
