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


class SDXLEngine:
    """The engine on ``builtin:tiny-sdxl``: both text encoders, the Denoiser with SDXL's added conditions."""

    def __init__(self, tiny_sdxl, max_rows_per_tick: int = 16, deterministic: bool = True):
        from deployments.engine.prompts import SDXLPromptEncoder

        info = tiny_sdxl["info"]
        self.info = info
        prep = make_batch_invariant if deterministic else (lambda m: m)
        self.tokenizer, self.tokenizer_2 = tiny_sdxl["tokenizer"], tiny_sdxl["tokenizer_2"]
        self.text_encoder = copy.deepcopy(tiny_sdxl["text_encoder"])
        self.text_encoder_2 = copy.deepcopy(tiny_sdxl["text_encoder_2"])
        self.unet = prep(copy.deepcopy(tiny_sdxl["unet"]))
        self.vae = tiny_sdxl["vae"]
        self.deterministic = deterministic
        first = PromptEncoder(self.tokenizer, self.text_encoder, rowwise=deterministic, hidden_layer="penultimate")
        second = PromptEncoder(
            self.tokenizer_2, self.text_encoder_2, rowwise=deterministic, hidden_layer="penultimate", pooled=True
        )
        self.prompts = SDXLPromptEncoder(first, second, force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt)
        self.schedulers = SchedulerFactory(info.scheduler_class, info.scheduler_config)
        self.steps = StepScheduler(
            self.unet, self.schedulers, vae_scale_factor=info.vae_scale_factor, max_rows_per_tick=max_rows_per_tick
        )

    def request(
        self,
        prompt,
        negative_prompt="",
        *,
        size=64,
        height=None,
        steps=5,
        guidance_scale=6.0,
        seed=0,
        scheduler="default",
        micro=None,
        adapters=(),
        text_adapters=(),
        text_adapters_2=(),
        conditioning=None,
    ):
        from deployments.messages import MicroConditioning

        height = size if height is None else height
        (e,) = self.prompts.encode_prompt_pairs([prompt], [negative_prompt], [text_adapters], [text_adapters_2])
        pos_ids, neg_ids = (micro or MicroConditioning()).time_ids(height, size)
        return DenoiseRequest(
            e.prompt_embeds,
            e.negative_prompt_embeds,
            height,
            size,
            steps,
            guidance_scale,
            seed,
            scheduler,
            adapters=adapters,
            pooled_prompt_embeds=e.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=e.negative_pooled_prompt_embeds,
            add_time_ids=pos_ids,
            negative_add_time_ids=neg_ids,
            conditioning=conditioning,
        )

    def run_latents(self, requests):
        jobs = self.steps.submit(requests)
        while not self.steps.idle:
            self.steps.tick()
        return torch.cat([j.x_t for j in jobs])

    def pipeline(self, scheduler="default", cls=None):
        """``StableDiffusionXLPipeline`` (or ``cls``) over the very same modules."""
        from diffusers import StableDiffusionXLPipeline

        pipe = (cls or StableDiffusionXLPipeline)(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.schedulers.create(scheduler),
            force_zeros_for_empty_prompt=self.info.force_zeros_for_empty_prompt,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def reference_latents(
        self,
        prompt,
        negative_prompt="",
        *,
        size=64,
        height=None,
        steps=5,
        guidance_scale=6.0,
        seed=0,
        scheduler="default",
        micro=None,
        pipe=None,
    ):
        """diffusers' latents; an empty negative prompt is passed as None (not given), as the API treats it."""
        from deployments.messages import MicroConditioning

        micro = micro or MicroConditioning()
        pipe = pipe or self.pipeline(scheduler)
        return pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            height=size if height is None else height,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            original_size=micro.original_size,
            crops_coords_top_left=micro.crops_coords_top_left,
            target_size=micro.target_size,
            negative_original_size=micro.negative_original_size,
            negative_crops_coords_top_left=micro.negative_crops_coords_top_left,
            negative_target_size=micro.negative_target_size,
            output_type="latent",
        ).images
