"""(c) diffusers on the same model in the same run, and (f) its images against the served ones.

Two pipelines share the text encoder: one over an unwrapped copy of the UNet
(no LoRA), one over a copy with the suite's adapters as peft layers
(``unet.add_adapter`` with the weights copied in, as bench_multi_lora_gpu.py
does). The pipelines' VAE runs in the run's dtype, as a diffusers fp16
pipeline's does; for the comparison with the served images both sides'
latents are decoded by the engine's VAE.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from benchmarks.bench_multi_lora import MixedBatchCounter, peft_adapter_names
from benchmarks.bench_multi_lora_gpu import add_peft_adapters
from deployments.engine.images import decode
from deployments.engine.schedulers import SchedulerFactory

from .models import UNET_ATTN, ModelParts, Request
from .served import ServedEngine
from .settings import Budget, ModelRun, SuiteSettings


class Pipelines:
    """diffusers' ``StableDiffusionPipeline`` over a plain and a peft copy of the UNet."""

    def __init__(self, parts: ModelParts, plain_unet, peft_unet, host_weights: list[dict], s: SuiteSettings):
        from diffusers import StableDiffusionPipeline

        dtype = next(plain_unet.parameters()).dtype
        self.names = add_peft_adapters(peft_unet, host_weights, s.rank, dtype, targets=UNET_ATTN)
        vae = parts.vae if next(parts.vae.parameters()).dtype == dtype else copy.deepcopy(parts.vae).to(dtype)
        factory = SchedulerFactory(parts.info.scheduler_class, parts.info.scheduler_config)

        def pipeline(unet):
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=parts.text_encoder,
                tokenizer=parts.tokenizer,
                unet=unet,
                scheduler=factory.create(s.scheduler),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe

        self.plain, self.peft = pipeline(plain_unet), pipeline(peft_unet)
        self.device = next(plain_unet.parameters()).device
        self._active: int | None = None

    def call(self, pipe, requests: list[Request], run: ModelRun, steps: int | None = None, output_type: str = "pt"):
        """One pipeline call over ``requests`` (their prompts, seeds); the output on the host."""
        out = pipe(
            [r.prompt for r in requests],
            negative_prompt=None,  # "" for SD1: the engine's negative prompt
            height=run.size_px,
            width=run.size_px,
            num_inference_steps=steps or run.steps,
            guidance_scale=run.guidance_scale,
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            output_type=output_type,
        ).images
        return out.float().cpu() if isinstance(out, torch.Tensor) else out

    def switch(self, adapter: int) -> None:
        """``set_adapters`` to one adapter, when it changes (what a one-adapter-at-a-time server does)."""
        if adapter != self._active:
            self.peft.unet.set_adapters([self.names[adapter]], weights=[1.0])
            self._active = adapter

    def mixed(self, requests: list[Request], run: ModelRun, counter: MixedBatchCounter, steps: int | None = None):
        """peft's mixed batch: every adapter active, each CFG row routed by ``adapter_names``."""
        self.peft.unet.set_adapters(self.names, weights=[1.0] * len(self.names))
        self._active = None
        names = [self.names[r.adapter] for r in requests]
        with peft_adapter_names(self.peft.unet, names + names), counter.watching():  # rows: (negative, positive)
            return self.call(self.peft, requests, run, steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def diffusers_part(pipes: Pipelines, requests: list[Request], run: ModelRun, s: SuiteSettings, budget: Budget, log):
    """Images/s of: one image per call (its adapter set first), 8 per call without LoRA, peft's mixed batch of 8."""
    out: dict = {}
    per_call = s.adapters  # 8 images per call
    warm_steps = min(2, run.steps)

    def timed(label: str, calls: list, fn, measurements_left: int) -> None:
        share = budget.share(measurements_left)
        fn(calls[0], warm_steps)  # warm-up: kernels, peft's lazy set-up
        _sync(pipes.device)
        start = time.perf_counter()
        images = 0
        for batch in calls:
            fn(batch, None)
            images += len(batch)
            if time.perf_counter() - start > share:
                break
        _sync(pipes.device)
        wall = time.perf_counter() - start
        out[label] = {"images": images, "wall_s": round(wall, 4), "images_per_s": images / wall}
        log(f"  diffusers {label}: {images / wall:.2f} images/s ({images} images)")

    def one(batch, steps):
        pipes.switch(batch[0].adapter)
        pipes.call(pipes.peft, batch, run, steps)

    timed("one_per_call_lora", [[r] for r in requests], one, 3)
    batches = [requests[i : i + per_call] for i in range(0, len(requests) - per_call + 1, per_call)]
    timed("batch_8_no_lora", batches, lambda b, steps: pipes.call(pipes.plain, b, run, steps), 2)
    counter = MixedBatchCounter()
    timed("peft_mixed_8", batches, lambda b, steps: pipes.mixed(b, run, counter, steps), 1)
    out["peft_mixed_8"]["mixed_batch_forward_calls"] = counter.calls
    if counter.calls == 0:
        raise RuntimeError("peft's mixed-batch path was never taken: the peft figure would measure something else")
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf where they are equal)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def served_vs_diffusers(engine: ServedEngine, pipes: Pipelines, check: list[Request], run: ModelRun) -> dict:
    """The same requests served by the engine (in one batch) and by diffusers one at a time with ``set_adapters``
    (same weights, seeds, scheduler, guidance); both latents decoded by the engine's VAE."""
    served = engine.closed_loop(check, len(check), keep=True)
    if served.failed:
        return {"error": f"{served.failed} of {len(check)} served images failed"}
    per_image = []
    for r in check:
        pipes.switch(r.adapter)
        z = pipes.call(pipes.peft, [r], run, output_type="latent")  # [1, c, h, w]
        theirs = decode(engine.parts.vae, z.to(engine.lora.device))[0]
        z_base = pipes.call(pipes.plain, [r], run, output_type="latent")  # the same request without its adapter
        base = decode(engine.parts.vae, z_base.to(engine.lora.device))[0]
        ours = served.pixels[r.index]
        per_image.append(
            {
                "request": r.index,
                "adapter": r.adapter,
                "psnr_db": psnr(ours, theirs),
                # What a served image that missed its adapter would score: the check's floor.
                "psnr_vs_no_adapter_db": psnr(ours, base),
                "latents_max_abs": (served.latents[r.index] - z.float().cpu()).abs().max().item(),
                "pixels_max_abs": (ours - theirs).abs().max().item(),
            }
        )
    return {
        "images": per_image,
        "min_psnr_db": min(p["psnr_db"] for p in per_image),
        "max_psnr_vs_no_adapter_db": max(p["psnr_vs_no_adapter_db"] for p in per_image),
    }
