"""VAE deployment: batched latent decoding and image encoding (PNG, JPEG, WebP)."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from .engine import models
from .engine.config import ModelConfig, VAEConfig
from .engine.images import decode, encode_image, to_uint8
from .engine.runtime import prepare_runtime


@serve.deployment(name="VAE")
class VAE:
    def __init__(self, model: ModelConfig, config: VAEConfig):
        rt = prepare_runtime(model)
        self.vae = models.load_vae(rt.info.directory, rt.device, rt.dtype)
        self.per_image = rt.deterministic
        self._decode_batch.set_max_batch_size(config.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def decode(self, denoised: dict, output_format: str) -> dict:
        """Decode a request's latents and encode each image; passes the earlier stages' timings on."""
        start = time.perf_counter()
        images = await self._decode_batch(denoised["latents"])  # [n, 3, H, W] in [0, 1]
        pixels = to_uint8(images)
        files = await asyncio.to_thread(lambda: [encode_image(p, output_format) for p in pixels])
        return {
            "images": files,
            "encode_ms": denoised["encode_ms"],
            "queue_ms": denoised["queue_ms"],
            "denoise_ms": denoised["denoise_ms"],
            "decode_ms": 1000.0 * (time.perf_counter() - start),
            "trace": denoised.get("trace", {}),
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
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

    def ready(self) -> bool:
        return True
