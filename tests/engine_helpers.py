"""Build the Ray-free engine on the tiny model, and diffusers' reference pipeline on the same modules."""

from __future__ import annotations

import copy

import torch

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.images import decode
from deployments.engine.prompts import PromptEncoder
from deployments.engine.schedulers import SchedulerFactory
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler


class Engine:
    """TextEncoder + Denoiser + VAE work, in-process, as the deployments run it (deterministic mode)."""

    def __init__(self, tiny, max_rows_per_tick: int = 16, max_queued: int = 64, deterministic: bool = True):
        info = tiny["info"]
        self.info = info
        self.tokenizer = tiny["tokenizer"]
        prep = make_batch_invariant if deterministic else (lambda m: m)
        self.text_encoder = copy.deepcopy(tiny["text_encoder"])  # deterministic: one row per call instead
        self.unet = prep(copy.deepcopy(tiny["unet"]))
        self.vae = tiny["vae"]
        self.deterministic = deterministic
        self.prompts = PromptEncoder(self.tokenizer, self.text_encoder, rowwise=deterministic)
        self.schedulers = SchedulerFactory(info.scheduler_class, info.scheduler_config)
        self.steps = StepScheduler(
            self.unet,
            self.schedulers,
            vae_scale_factor=info.vae_scale_factor,
            max_rows_per_tick=max_rows_per_tick,
            max_queued=max_queued,
        )

    def request(self, prompt, negative_prompt="", *, size=64, steps=6, guidance_scale=7.5, seed=0, scheduler="default"):
        pos, neg = self.prompts.encode_prompt([prompt, negative_prompt])
        return DenoiseRequest(pos, neg, size, size, steps, guidance_scale, seed, scheduler)

    def run(self, requests):
        """Submit together, tick to completion; float images [n, 3, H, W]."""
        jobs = self.steps.submit(requests)
        while not self.steps.idle:
            self.steps.tick()
        return decode(self.vae, torch.cat([j.x_t for j in jobs]), per_image=self.deterministic)

    def pipeline(self, scheduler="default", cls=None):
        """A diffusers pipeline (``StableDiffusionPipeline`` unless ``cls``) over the very same modules."""
        from diffusers import StableDiffusionPipeline

        pipe = (cls or StableDiffusionPipeline)(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.schedulers.create(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def reference(
        self, prompt, negative_prompt="", *, size=64, steps=6, guidance_scale=7.5, seed=0, scheduler="default"
    ):
        pipe = self.pipeline(scheduler)
        return pipe(
            prompt,
            negative_prompt=negative_prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
