"""Denoiser deployment: the UNet and scheduler loop, step-level batched across requests and adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import torch
from ray import serve

from lora_registry.config import RegistryConfig

from .config import DenoiserConfig
from .engine import models
from .engine.adapters import ModelAdapters, open_model_registry
from .engine.conditioning import ImageConditioning
from .engine.config import LoRAConfig, ModelConfig
from .engine.image_encoder import load_ip_adapter_weights
from .engine.ip_adapter import IPAdapterModel
from .engine.loop import DenoiseLoop
from .engine.previews import preview_data_url, unit_variance
from .engine.runtime import prepare_runtime
from .engine.schedulers import SchedulerFactory
from .engine.step_graphs import make_step_graphs
from .engine.step_scheduler import DenoiseJob, DenoiseRequest, StepScheduler
from .messages import (
    Denoised,
    DenoiseEvent,
    DenoiseParams,
    ImageEmbeddings,
    MicroConditioning,
    Preview,
    PromptEmbeddings,
    Queued,
    Step,
    Trace,
)
from .metrics import DenoiserMetrics, adapter_label
from .routing import routing_stats


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, model: ModelConfig, config: DenoiserConfig, lora: LoRAConfig, registry: RegistryConfig):
        rt = prepare_runtime(model)
        info = rt.info
        unet = rt.prepare(models.load_unet(info.directory, rt.device, rt.dtype))
        self.registry, _ = open_model_registry(registry, info.directory)
        self.adapters = ModelAdapters(unet, "unet", self.registry, lora, deterministic=rt.deterministic)
        # IP-Adapter (model.ip_adapter): its weights checked against this UNet here, so a mismatch fails the start
        # with one line; its processors go on after the batch-invariant kernels and the LoRA layers.
        self.ip_adapter = None
        if model.ip_adapter is not None:
            weights = load_ip_adapter_weights(model.ip_adapter, model.uri, unet, model.cache_dir)
            self.ip_adapter = IPAdapterModel(unet, weights, max_rows=config.max_rows_per_tick)
            self.ip_adapter.install()
        rt.compile_unet(unet)  # model.compile: after the LoRA layers wrap the projections, before graph capture
        self.steps = StepScheduler(
            unet,
            SchedulerFactory(info.scheduler_class, info.scheduler_config),
            vae_scale_factor=info.vae_scale_factor,
            max_rows_per_tick=config.max_rows_per_tick,
            max_queued=config.max_queued_images,
            max_queued_total=config.max_queued_images_total,
            tenant_weights=config.tenant_weights,
            preempt=config.preempt,
            protected_tick_rows=config.protected_tick_rows,
            lora=self.adapters.lora,
            residency=self.adapters.residency,
            ip_adapter=self.ip_adapter,
            # Each tick's UNet step on static buffers, replayed from CUDA graphs on CUDA (denoiser.cuda_graphs).
            step_graphs=make_step_graphs(
                unet,
                self.adapters.lora,
                config.cuda_graphs,
                max_rows=config.max_rows_per_tick,
                native_latent_side=info.default_side // info.vae_scale_factor,
            ),
        )
        self.sdxl = info.sdxl
        self.loop = DenoiseLoop(self.steps)
        self.metrics = DenoiserMetrics(info.name)  # every series labelled with the base model
        self.steps.on_tick = self._on_tick
        self.steps.on_adapter_wait = self._on_adapter_wait
        self.adapters.on_change = self.loop.wake_threadsafe  # a load finished: waiting jobs may start
        self.adapters.residency.observer = self._on_adapter_event
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def denoise(
        self,
        encoded: PromptEmbeddings,
        params: DenoiseParams,
        conditioning: list[ImageConditioning] | None = None,
        style: ImageEmbeddings | None = None,
    ) -> Denoised:
        """Denoise ``params.num_images`` images; image k uses seed ``params.seed + k``.

        ``encoded`` is the TextEncoder's answer (a chained DeploymentResponse, resolved by Serve).
        ``conditioning``: for img2img and inpainting, the VAE's ``encode`` answer (one
        ``ImageConditioning`` per image; chained, resolved by Serve). ``style``: with a style image, the
        ImageEncoder's answer (chained), read by IP-Adapter at ``params.style_scale``.
        """
        requests = self._build_requests(encoded, params, conditioning, style)
        try:
            self._update_gauges()
            jobs = await self.loop.run(requests)
        finally:
            self._update_gauges()
        return self._result(encoded, jobs)

    async def denoise_stream(
        self,
        encoded: PromptEmbeddings,
        params: DenoiseParams,
        preview_every_steps: int = 0,
        conditioning: list[ImageConditioning] | None = None,
        style: ImageEmbeddings | None = None,
    ) -> AsyncIterator[DenoiseEvent]:
        """``denoise`` with progress: call with ``handle.options(stream=True)``.

        Yields, as they change: ``Queued`` while no image has started, ``Step`` (the slowest
        image's step), with ``preview_every_steps > 0`` also ``Preview`` (a latent-resolution
        approximation of the slowest image, ``engine/previews.py``), and finally the ``Denoised``
        result. Closing or cancelling the stream cancels the images: they leave the batch at the
        next tick.
        """
        last: Queued | Step | None = None
        previewed = 0
        requests = self._build_requests(encoded, params, conditioning, style)
        try:
            self._update_gauges()
            async for jobs, finished in self.loop.stream(requests):
                if finished:
                    break
                p = self.steps.progress(jobs)
                event: Queued | Step
                if p["position"] is not None:
                    event = Queued(position=p["position"], eta_s=p["eta_s"])
                else:
                    event = Step(step=p["step"], steps=p["steps"], eta_s=p["eta_s"])
                # A new position or step is news; so is the first ETA (None before the first tick ran).
                if (
                    last is None
                    or replace(event, eta_s=None) != replace(last, eta_s=None)
                    or (last.eta_s is None) != (event.eta_s is None)
                ):
                    last = event
                    yield event
                step, steps = p["step"], p["steps"]
                if preview_every_steps > 0 and step // preview_every_steps > previewed and step < steps:
                    previewed = step // preview_every_steps
                    slowest = min(jobs, key=lambda j: j.index)
                    latents = unit_variance(slowest.x_t, slowest.scheduler, slowest.index)[0]  # [c, h, w]
                    yield Preview(step=step, steps=steps, image=preview_data_url(latents))
        finally:
            self._update_gauges()
        yield self._result(encoded, jobs)

    def _build_requests(
        self,
        encoded: PromptEmbeddings,
        params: DenoiseParams,
        conditioning: list[ImageConditioning] | None = None,
        style: ImageEmbeddings | None = None,
    ) -> list[DenoiseRequest]:
        """One ``DenoiseRequest`` per image from the encoder's answer, the request's params (its adapters
        by reference: the scheduler pins them at admission), (img2img / inpainting) the VAE's per-image
        conditioning and (a style image) the ImageEncoder's embeddings, the same for every image."""
        adapters = tuple((a.ref, float(a.weight)) for a in params.adapters)
        xl: dict = {}
        if self.sdxl:
            time_ids, negative_time_ids = (params.micro or MicroConditioning()).time_ids(params.height, params.width)
            xl = {
                "pooled_prompt_embeds": encoded.pooled_prompt_embeds,
                "negative_pooled_prompt_embeds": encoded.negative_pooled_prompt_embeds,
                "add_time_ids": time_ids,
                "negative_add_time_ids": negative_time_ids,
            }
        elif params.micro is not None:
            raise ValueError("SDXL micro-conditioning (original_size, crops_coords_top_left, target_size) needs SDXL")
        ip: dict = {}
        if style is not None:
            ip = {
                "ip_adapter_embeds": style.image_embeds,
                "negative_ip_adapter_embeds": style.negative_image_embeds,
                "ip_adapter_scale": params.style_scale,
            }
        return [
            DenoiseRequest(
                prompt_embeds=encoded.prompt_embeds,
                negative_prompt_embeds=encoded.negative_prompt_embeds,
                height=params.height,
                width=params.width,
                steps=params.steps,
                guidance_scale=params.guidance_scale,
                seed=params.seed + k,
                scheduler=params.scheduler,
                adapters=adapters,
                tenant=params.tenant,
                tenant_weight=params.tenant_weight,
                conditioning=conditioning[k] if conditioning else None,
                prompt_schedule=encoded.schedule,  # prompt editing / alternation / AND (None: none)
                **xl,
                **ip,
            )
            for k in range(params.num_images)
        ]

    def _result(self, encoded: PromptEmbeddings, jobs: list[DenoiseJob]) -> Denoised:
        slowest = max(jobs, key=lambda j: j.denoise_ms)
        return Denoised(
            latents=torch.cat([j.x_t for j in jobs]).cpu(),  # [n, c, h, w]
            encode_ms=encoded.encode_ms,
            queue_ms=max(j.queue_ms for j in jobs),
            denoise_ms=slowest.denoise_ms,
            step_ms=slowest.step_ms,
            trace=Trace(denoiser_replica=self.replica_id, denoiser_adapter_loads=self.adapters.residency.loads),
            encode_wait_ms=encoded.encode_wait_ms,
        )

    def _on_tick(self, rows: int, seconds: float) -> None:
        m = self.metrics
        m.rows_per_tick.observe(rows)
        m.step_latency.observe(1000.0 * seconds)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.active_images.set(len(self.steps.active))
        m.pending_steps.set(self.steps.pending_steps())
        m.set_queue_depths(self.steps.waiting.depths())
        m.set_adapter_memory(self.adapters.residency)

    def _on_adapter_event(self, event: str, ref, seconds: float) -> None:
        m = self.metrics
        label = m.adapters(adapter_label(ref))
        if event in ("hit", "miss"):
            m.adapter_requests.inc(tags={"adapter": label, "outcome": event})
        elif event == "load":
            m.adapter_load_latency.observe(1000.0 * seconds)
        elif event == "prefetch":
            m.adapter_prefetches.inc()
        elif event == "evict":
            m.adapter_evictions.inc()

    def _on_adapter_wait(self, seconds: float) -> None:
        self.metrics.adapter_wait.observe(1000.0 * seconds)

    def record_routing_stats(self) -> dict:
        """For ``routing.AdapterAffinityRouter``: the adapters this replica's memory really holds."""
        r = self.adapters.residency
        return routing_stats(r.resident(), r.capacity, len(r.pinned()))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (deployments/autoscaling.py scales on pending denoise work)."""
        return {
            "pending_images": float(len(self.steps.active) + len(self.steps.waiting)),
            "pending_steps": float(self.steps.pending_steps()),
        }

    def stats(self) -> dict:
        s = self.steps
        return {
            "replica": self.replica_id,
            "ticks": s.ticks_run,
            "rows": s.rows_run,
            "tick_seconds": s.tick_seconds,
            "active": len(s.active),
            "waiting": len(s.waiting),
            "cancelled": self.loop.cancelled_jobs,
            "waiting_by_tenant": s.waiting.depths(),
            "pauses": s.pauses,  # images paused for a tenant below its fair share of the rows
            "adapters": self.adapters.stats(),
        }

    def ready(self) -> bool:
        return True
