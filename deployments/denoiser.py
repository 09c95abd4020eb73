"""Denoiser deployment: the UNet and scheduler loop, step-level batched across requests."""

from __future__ import annotations

import torch
from ray import serve

from .engine import models
from .engine.config import DenoiserConfig, ModelConfig
from .engine.loop import DenoiseLoop
from .engine.runtime import prepare_runtime
from .engine.schedulers import SchedulerFactory
from .engine.step_scheduler import DenoiseRequest, StepScheduler


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, model: ModelConfig, config: DenoiserConfig):
        rt = prepare_runtime(model)
        info = rt.info
        unet = rt.prepare(models.load_unet(info.directory, rt.device, rt.dtype))
        self.steps = StepScheduler(
            unet,
            SchedulerFactory(info.scheduler_class, info.scheduler_config),
            vae_scale_factor=info.vae_scale_factor,
            max_rows_per_tick=config.max_rows_per_tick,
            max_queued=config.max_queued_images,
        )
        self.loop = DenoiseLoop(self.steps)

    async def denoise(self, encoded: dict, params: dict) -> dict:
        """Denoise ``params["num_images"]`` images; image k uses seed ``params["seed"] + k``.

        ``encoded`` is the TextEncoder's output (a chained DeploymentResponse,
        resolved by Serve). Returns latents ``[n, c, h, w]`` and timings.
        """
        requests = [
            DenoiseRequest(
                prompt_embeds=encoded["prompt_embeds"],
                negative_prompt_embeds=encoded["negative_prompt_embeds"],
                height=params["height"],
                width=params["width"],
                steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                seed=params["seed"] + k,
                scheduler=params["scheduler"],
            )
            for k in range(params["num_images"])
        ]
        jobs = await self.loop.run(requests)
        return {
            "latents": torch.cat([j.x_t for j in jobs]).cpu(),  # [n, c, h, w]
            "encode_ms": encoded["encode_ms"],
            "queue_ms": max(j.queue_ms for j in jobs),
            "denoise_ms": max(j.denoise_ms for j in jobs),
        }

    def stats(self) -> dict:
        s = self.steps
        return {
            "ticks": s.ticks_run,
            "rows": s.rows_run,
            "active": len(s.active),
            "waiting": len(s.waiting),
        }

    def ready(self) -> bool:
        return True
