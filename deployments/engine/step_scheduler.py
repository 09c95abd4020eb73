"""The denoise loop, batched across requests at every step.

Each request (one image) is a ``DenoiseJob`` with its own scheduler instance,
latents ``x_t``, timestep list and random generator. A *tick* runs one UNet
forward over every active job of one shape bucket, each at its own timestep
(classifier-free guidance rows included), then the scheduler step: one
vectorized step per scheduler kind over all its jobs (``scheduler_steps``:
DDIM, Euler, Euler a, DPM++ 2M), each job's diffusers object for the others.
Jobs join at the next tick and leave as soon as their last step is done, so a
short request never waits for a long batch to finish. Nothing in a tick reads
the device back on the host (``host_syncs``), except one check of the finished
jobs' latents as they leave; the per-request fallback's own syncs aside.

The arithmetic per job is exactly ``StableDiffusionPipeline.__call__``'s
(``scale_model_input``, guidance and ``scheduler.step``'s operations on the same
values), which is what makes the served image equal the pipeline's. Image-
conditioned jobs (``DenoiseRequest.conditioning``) follow
``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` the
same way, in the same batches as text-to-image jobs:

- img2img: the last ``int(steps * strength)`` timesteps, from the init
  latents noised to the first of them;
- inpainting with a 4-channel UNet: after every step the kept region is
  replaced by the init latents noised to the next timestep (latent blending);
- a 9-channel (inpainting) UNet reads ``[x_t, mask, masked_image_latents]``
  concatenated on channels. A text-to-image job on such a UNet gets mask = 1
  (repaint everything) and masked-image latents = 0, with no VAE call.
  (AUTOMATIC1111 uses the latents of a mid-gray image instead; to get that or
  diffusers' exact behaviour, send a conditioning built by
  ``conditioning.encode_conditioning`` with an all-white mask at strength 1.)

SDXL (a UNet with ``addition_embed_type: "text_time"``) also reads per row the pooled text
embeddings and six time ids (``added_cond_kwargs``, ``StableDiffusionXLPipeline.__call__``):
each job carries its own (``DenoiseJob.added_cond``), so SDXL requests with different sizes,
crops and micro-conditioning share a forward whenever their shapes do.

A bucket is ``(latent height, latent width, context tokens)``: jobs share a
forward only when their latents and their prompt embeddings (77 tokens per
chunk) have the same shapes.

Adapters are taken at admission (with an ``AdapterResidency``): a waiting job
holds no slot. Each tick, the jobs in fair order that would fill the next two
ticks are told to the residency, which loads their missing adapters beside the
running batch; a job is admitted once its adapters are resident and pinned,
and unpins them when it leaves the batch. A job whose adapters are loading
lets later jobs pass (their adapters are resident, or they have none); a job
whose load waits for memory lets pass only jobs that take no new memory
(no adapters, or adapters already pinned by running jobs), so it cannot be
starved. ``queue_ms``, the queue position and the ETA include these waits.

Pausing for the fair share (``preempt``): an admitted image keeps its rows for all of its steps, so a
tenant below its fair share of the rows would wait for a flooder's image to finish. When the next job in fair
order does not fit and its tenant holds fewer than its share of the rows (``max_rows_per_tick`` x its weight /
the weights of the tenants with work), running jobs of tenants above their share are paused, newest first,
while each such tenant keeps at least its share: they go back to the front of their tenant's queue with their
latents, scheduler state and generator, and resume where they were. Rows are batch-invariant, so a paused
image is the same image.

A tick steps one bucket, and buckets take turns, so a running image waits one tick for each other bucket with
work: with a flooder's images in two sizes, a light tenant's image would step every other tick. With
``preempt``, the bucket of a running job whose tenant holds fewer rows than its share goes first, so a light
tenant's image steps every tick, as it would alone; no job waits more than ``MAX_TICK_SKIPS`` ticks in a row
for other buckets, so a flooder's other sizes still advance. ``protected_tick_rows`` also caps the rows of a tick
that steps a below-share tenant's image (the flooder's images in it take turns, none skipped more than
``MAX_TICK_SKIPS`` ticks in a row): where a tick's cost grows with its rows (a CPU; a GPU at full size), the light
image's steps then cost about what they cost alone, at the flooder's expense while it runs.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .conditioning import ImageConditioning, check_strength
from .fair_queue import FairQueue
from .prompts import PromptSchedule
from .scheduler_steps import JobSchedule, SchedulerStep, step_for
from .schedulers import SchedulerFactory


class QueueFullError(RuntimeError):
    """The denoiser's wait queue is at its bound; the client should retry later."""

    def __init__(self, queued: int, limit: int, retry_after_s: float):
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"denoiser queue is full ({queued} of {limit} images waiting); retry in {retry_after_s:.0f}s")

    def __reduce__(self):  # crosses process boundaries through Ray
        return type(self), (self.queued, self.limit, self.retry_after_s)


class NonFiniteLatentsError(ValueError):
    """An image's latents became NaN or infinite (it would decode to a black or noise image)."""

    def __init__(self, adapters: tuple[str, ...], steps: int):
        self.adapters = adapters
        self.steps = steps
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.adapters:
            return (
                f"the image became NaN/infinite during its {self.steps} steps with adapters "
                f"{', '.join(self.adapters)}; lower their scale or check their weights"
            )
        return f"the image became NaN/infinite during its {self.steps} steps"

    def __reduce__(self):
        return type(self), (self.adapters, self.steps)


@dataclass
class DenoiseRequest:
    """One image to denoise. Later stages add fields (adapters, init latents, masks) here."""

    prompt_embeds: torch.Tensor  # [tokens, hidden]
    negative_prompt_embeds: torch.Tensor  # [tokens, hidden]
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str = "default"
    # ((adapter, weight), ...) in the request's order. With an AdapterResidency the adapters are its keys
    # ("name@version"), pinned at admission; without one, slots of the UNet's MultiLoRAModel already loaded.
    adapters: tuple[tuple, ...] = ()
    tenant: str = ""
    tenant_weight: float | None = None  # the tenant key's weight (DenoiseParams.tenant_weight); None: the config's
    # img2img / inpainting: made by conditioning.encode_conditioning in the VAE stage. None: text-to-image.
    conditioning: ImageConditioning | None = None
    # SDXL ("text_time" UNets) only: the second encoder's pooled output and the six micro-conditioning
    # time ids (original size, crop top-left, target size; messages.MicroConditioning.time_ids).
    pooled_prompt_embeds: torch.Tensor | None = None  # [pooled]
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # [pooled]
    add_time_ids: tuple[int, ...] | None = None  # 6 numbers
    negative_add_time_ids: tuple[int, ...] | None = None
    # A1111's prompt editing, alternation and AND: the conditioning per step, each AND part its own UNet
    # row (``prepare_row_conditioning``). None: prompt_embeds / negative_prompt_embeds at every step.
    prompt_schedule: PromptSchedule | None = None
    # IP-Adapter (a StepScheduler with ``ip_adapter``): the reference image's encoded embeddings, as
    # ``ip_adapter.encode_image`` makes them: [dim] image_embeds (plain) or [tokens, dim] penultimate hidden
    # states ("plus"). With guidance the negative row reads ``negative_ip_adapter_embeds`` (None: zeros, as
    # diffusers' plain variant). ``ip_adapter_scale``: a number, or per-block scales as set_ip_adapter_scale.
    ip_adapter_embeds: torch.Tensor | None = None
    negative_ip_adapter_embeds: torch.Tensor | None = None
    ip_adapter_scale: float | dict = 1.0


@dataclass(frozen=True)
class RowConditioning:
    """A scheduled job's UNet conditioning per call: row r at call i reads ``embeds[r][entries[i][r]]``.

    Rows: the negative prompt's (with guidance or AND), then one per AND part. ``context`` and
    ``pooled_at`` give views, so a tick's ``torch.cat`` of all jobs' rows is the only copy.
    """

    embeds: tuple[torch.Tensor, ...]  # per row: [entries, tokens, hidden], on the UNet's device
    pooled: tuple[torch.Tensor, ...] | None  # per row: [entries, pooled]; SDXL only
    entries: tuple[tuple[int, ...], ...]  # per UNet call: each row's entry
    weights: tuple[float, ...] | None  # per AND part: A1111's composable guidance; None: plain CFG

    def context(self, call: int) -> list[torch.Tensor]:
        """Each row's ``[1, tokens, hidden]`` at UNet call ``call``."""
        return [e[k : k + 1] for e, k in zip(self.embeds, self.entries[call], strict=True)]

    def pooled_at(self, call: int) -> list[torch.Tensor]:
        """Each row's ``[1, pooled]`` at UNet call ``call`` (SDXL)."""
        return [p[k : k + 1] for p, k in zip(self.pooled, self.entries[call], strict=True)]


def composable_guidance(eps: torch.Tensor, weights: tuple[float, ...], guidance_scale: float) -> torch.Tensor:
    """A1111's ``combine_denoised``: ``eps_uncond + sum_i (eps_i - eps_uncond) * (weights[i] * guidance_scale)``.

    ``eps``: ``[1 + parts, c, h, w]``, the negative prompt's row first; returns ``[1, c, h, w]``.
    Added part by part in A1111's order.
    """
    eps_uncond = eps[:1]
    guided = eps_uncond.clone()
    for i, weight in enumerate(weights):
        guided += (eps[1 + i : 2 + i] - eps_uncond) * (weight * guidance_scale)
    return guided


@dataclass(eq=False)
class DenoiseJob:
    id: int
    request: DenoiseRequest
    bucket: tuple[int, int, int]  # (latent height, latent width, context tokens)
    scheduler: object  # the request's diffusers scheduler (the reference for its schedule)
    timesteps: torch.Tensor  # [num_ticks]
    x_t: torch.Tensor  # [1, channels, h, w]
    context: torch.Tensor  # [rows, tokens, hidden]: (negative, positive) with CFG, else (positive,)
    step_kwargs: dict
    enqueued_at: float
    schedule: JobSchedule  # how its steps run: a vectorized kind's coefficient table, or the scheduler itself
    unet_timesteps: torch.Tensor  # [num_ticks] float32: the UNet's timestep input
    index: int = 0
    last_tick: int = -1
    started_at: float | None = None
    finished_at: float | None = None
    error: BaseException | None = None
    cancelled: bool = field(default=False)
    unet_extra: torch.Tensor | None = None  # [rows, 5, h, w]: mask, masked-image latents (9-channel UNets)
    row_conditioning: RowConditioning | None = None  # prompt editing / alternation / AND: context per call
    blend_mask: torch.Tensor | None = None  # [1, 1, h, w]: 4-channel inpainting, 1 = repaint
    image_latents: torch.Tensor | None = None  # [1, 4, h, w]: the init image, for blending
    noise: torch.Tensor | None = None  # [1, 4, h, w]: the initial noise, for blending
    # SDXL: {"text_embeds": [rows, pooled], "time_ids": [rows, 6]}, (negative, positive) rows as context.
    added_cond: dict[str, torch.Tensor] | None = None
    slots: tuple[tuple[int, float], ...] = ()  # ((slot, weight), ...): set at admission, routed every tick
    pinned: tuple = ()  # the residency keys this job pinned at admission (released when it leaves)
    adapter_wait_since: float | None = None  # first admission pass its adapters were not resident
    ip_image: object | None = None  # ip_adapter.RowImage: its rows' image tokens and scales; None: no image
    admitted: int = -1  # admission order (the newest running job of a tenant is paused first)
    pauses: int = 0  # times it was paused to make room for a tenant below its fair share
    ready_tick: int = 0  # ``ticks_run`` when it was last admitted (a paused job is admitted again)
    step_seconds: float = 0.0  # time in the forwards (and scheduler steps) that stepped it

    @property
    def adapter_keys(self) -> tuple:
        return tuple(key for key, _ in self.request.adapters)

    @property
    def cfg(self) -> bool:
        return self.context.shape[0] == 2

    @property
    def rows(self) -> int:
        return self.context.shape[0]

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def queue_ms(self) -> float:
        return 1000.0 * ((self.started_at or self.enqueued_at) - self.enqueued_at)

    @property
    def denoise_ms(self) -> float:
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return 1000.0 * (self.finished_at - self.started_at)

    @property
    def step_ms(self) -> float:
        """Of ``denoise_ms``, the ticks that stepped it; the rest: other buckets' ticks, pauses, the loop."""
        return 1000.0 * self.step_seconds


class StepScheduler:
    """Admits denoise jobs and advances them together, one UNet forward per tick.

    Not thread-safe for concurrent ``tick`` calls (one driver runs ticks), but
    ``submit`` may be called from another thread while a tick runs.
    """

    MAX_TICK_SKIPS = 3  # with ``preempt``: the most ticks in a row a running job waits for other buckets

    def __init__(
        self,
        unet: torch.nn.Module,
        schedulers: SchedulerFactory,
        *,
        vae_scale_factor: int,
        max_rows_per_tick: int = 16,
        max_queued: int = 64,
        max_queued_total: int | None = None,
        tenant_weights: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        lora=None,
        residency=None,
        step_graphs=None,
        ip_adapter=None,
        preempt: bool = True,
        protected_tick_rows: int = 0,
    ):
        """``max_queued`` bounds each tenant's waiting images, ``max_queued_total`` (default 4x) all of them.

        ``lora``: a ``MultiLoRAModel`` over ``unet``; ``residency``: an ``AdapterResidency`` over it
        (requests then name adapters by key, pinned at admission). ``step_graphs``: a ``StepGraphs`` over
        ``unet`` (and ``lora``): each tick's forward then runs on its static buffers, replayed from a CUDA
        graph where captured (``engine/step_graphs.py``). ``preempt``: pause running jobs of tenants above their
        fair share of the rows to admit a tenant below it, and step its bucket first (see the module docstring).
        ``protected_tick_rows`` (with ``preempt``; 0: no cap): the most rows of a tick that steps an image of a tenant
        below its share; that tenant's rows always go, other tenants' fill the rest, longest waiting first.
        """
        if max_rows_per_tick < 2:
            raise ValueError(f"max_rows_per_tick must be >= 2 (one image with guidance), got {max_rows_per_tick}")
        self.unet = unet
        self.lora = lora  # a MultiLoRAModel over ``unet``, or None
        self.step_graphs = step_graphs  # a StepGraphs over ``unet``, or None: plain eager forwards
        self.residency = residency
        self.ip_adapter = ip_adapter  # an installed ip_adapter.IPAdapterModel over ``unet``, or None
        self.on_tick: Callable[[int, float], None] | None = None  # (rows, seconds) after each forward
        # (seconds) per admitted job with adapters: how long it waited for them to become resident.
        self.on_adapter_wait: Callable[[float], None] | None = None
        self.schedulers = schedulers
        self.vae_scale_factor = vae_scale_factor
        self.max_rows_per_tick = max_rows_per_tick
        self.max_queued = max_queued
        self.max_queued_total = max_queued_total if max_queued_total is not None else 4 * max_queued
        self.clock = clock
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.latent_channels = unet.config.out_channels
        self.unet_in_channels = unet.config.in_channels
        # SDXL's micro-conditioning: pooled text embeddings and time ids through the UNet's add_embedding.
        self.text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if self.unet_in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise ValueError(
                f"the UNet reads {self.unet_in_channels} channels: expected {self.latent_channels} (latents) or "
                f"{2 * self.latent_channels + 1} (an inpainting UNet: latents, mask, masked-image latents)"
            )
        self.waiting: FairQueue[DenoiseJob] = FairQueue(tenant_weights)
        self.active: list[DenoiseJob] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.preempt = preempt
        if protected_tick_rows < 0:
            raise ValueError(f"protected_tick_rows must be >= 0 (0: no cap), got {protected_tick_rows}")
        self.protected_tick_rows = protected_tick_rows
        self._admissions = itertools.count()
        self.pauses = 0  # jobs paused for a tenant below its fair share (a metric)
        # Counters (exported as metrics by the deployment).
        self.ticks_run = 0
        self.rows_run = 0
        self.tick_seconds = 0.0

    # -- admission ---------------------------------------------------------

    def prepare(self, request: DenoiseRequest) -> DenoiseJob:
        """Build a job: its scheduler, timesteps, initial latents ``x_T`` and step arguments.

        The steps of ``StableDiffusionPipeline.__call__`` before its denoising loop
        (and of ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``
        for an image-conditioned job), in the pipelines' order, one method per step
        so that each reads against the diffusers function it mirrors:
        ``check_inputs``, ``prepare_prompt_embeds`` (``encode_prompt`` ran in the
        TextEncoder stage), ``retrieve_timesteps`` then ``get_timesteps``,
        ``prepare_latents``, ``prepare_mask_latents``, ``prepare_extra_step_kwargs``.
        Bad input raises here, in ``submit``, before any UNet work.
        """
        shape = self.check_inputs(request)
        context = self.prepare_prompt_embeds(request)
        scheduler = self.schedulers.create(request.scheduler, seed=request.seed)  # DPM++ SDE seeds its noise
        # Timesteps before latents: init_noise_sigma depends on them for sigma-based schedulers.
        timesteps = self.retrieve_timesteps(scheduler, request.steps)
        cond = request.conditioning
        if cond is not None:
            timesteps = self.get_timesteps(scheduler, request.steps, cond.strength)
        generator = self._generator(request)
        x_T, noise, image_latents = self.prepare_latents(scheduler, shape, generator, timesteps, cond)
        row_conditioning = None
        if request.prompt_schedule is not None:
            row_conditioning = self.prepare_row_conditioning(request, scheduler, len(timesteps))
            context = torch.cat(row_conditioning.context(0))  # [rows, tokens, hidden] at the first call
        mask_tensors = self.prepare_mask_latents(cond, shape, context.shape[0], noise, image_latents)
        added_cond = None
        if self.text_time:
            added_cond = self.prepare_added_conditions(request, context.shape[0], row_conditioning)
        ip_image = self.prepare_ip_adapter_image_embeds(request, context.shape[0])
        step_kwargs = self.prepare_extra_step_kwargs(scheduler, generator, eta=0.0)
        schedule = step_for(scheduler, step_kwargs).prepare(scheduler, timesteps, generator, step_kwargs)
        return DenoiseJob(
            id=next(self._ids),
            request=request,
            bucket=(shape[2], shape[3], context.shape[1]),
            scheduler=scheduler,
            timesteps=timesteps,
            x_t=x_T,
            context=context,
            step_kwargs=step_kwargs,
            enqueued_at=self.clock(),
            schedule=schedule,
            unet_timesteps=timesteps.to(torch.float32),
            added_cond=added_cond,
            row_conditioning=row_conditioning,
            ip_image=ip_image,
            **mask_tensors,
        )

    def prepare_ip_adapter_image_embeds(self, request: DenoiseRequest, rows: int):
        """The job's IP-Adapter rows (``ip_adapter.RowImage``), or None without a reference image.

        ``StableDiffusionPipeline.prepare_ip_adapter_image_embeds`` with ``do_classifier_free_guidance``:
        the unconditional row(s) first, reading the negative embeddings; the prompt's row(s) the image's.
        """
        if request.ip_adapter_embeds is None:
            return None
        if self.ip_adapter is None:
            raise ValueError("ip_adapter_embeds given but this model is served without IP-Adapter weights")
        if self.ip_adapter.buffers.max_rows < self.max_rows_per_tick:  # a wiring error, before any forward
            raise ValueError(
                f"the IP-Adapter's buffers hold {self.ip_adapter.buffers.max_rows} rows; "
                f"max_rows_per_tick is {self.max_rows_per_tick}"
            )
        positive = len(request.prompt_schedule.parts) if request.prompt_schedule is not None else 1
        return self.ip_adapter.prepare(
            request.ip_adapter_embeds,
            request.negative_ip_adapter_embeds,
            rows,
            rows - positive,
            request.ip_adapter_scale,
        )

    def check_inputs(self, request: DenoiseRequest) -> tuple[int, int, int, int]:
        """Refuse a request this UNet cannot run; return its latent shape ``(1, channels, h, w)``.

        ``StableDiffusionPipeline.check_inputs`` (a size divisible by the VAE's scale factor;
        ``prompt_embeds`` and ``negative_prompt_embeds`` of one shape when guidance uses both),
        ``StableDiffusionImg2ImgPipeline.check_inputs`` (strength, here with at least one step
        left) and ``StableDiffusionInpaintPipeline.__call__``'s check that mask, masked image
        and latents fit the UNet (``_check_conditioning``).
        """
        s = self.vae_scale_factor
        if request.height % s or request.width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {request.height}x{request.width}")
        shape = (1, self.latent_channels, request.height // s, request.width // s)
        cond = request.conditioning
        if cond is not None:
            check_strength(cond.strength, request.steps)
            self._check_conditioning(cond, shape)
        pos, neg = request.prompt_embeds, request.negative_prompt_embeds
        if request.guidance_scale > 1.0 and neg.shape != pos.shape:
            raise ValueError(
                f"negative_prompt_embeds {list(neg.shape)} must have the shape of prompt_embeds {list(pos.shape)}"
            )
        self._check_added_conditions(request)
        if request.prompt_schedule is not None:
            self._check_prompt_schedule(request)
        return shape

    @staticmethod
    def schedule_rows(request: DenoiseRequest) -> int:
        """UNet rows of a scheduled request: one per AND part, and the negative prompt's with guidance or AND."""
        schedule = request.prompt_schedule
        uncond = schedule.composable or request.guidance_scale > 1.0
        return len(schedule.parts) + uncond

    def _check_prompt_schedule(self, request: DenoiseRequest) -> None:
        """The schedule's rows fit a tick, and every entry has the prompt's token count and width."""
        schedule = request.prompt_schedule
        rows = self.schedule_rows(request)
        if rows > self.max_rows_per_tick:
            raise ValueError(
                f"a prompt of {len(schedule.parts)} AND parts takes {rows} UNet rows per image; "
                f"max_rows_per_tick is {self.max_rows_per_tick}"
            )
        if len(schedule.weights) != len(schedule.parts):
            raise ValueError(f"{len(schedule.weights)} AND weights for {len(schedule.parts)} parts")
        want = list(request.prompt_embeds.shape)
        for name, c in [*((f"parts[{i}]", c) for i, c in enumerate(schedule.parts)), ("negative", schedule.negative)]:
            if c.embeds.ndim != 3 or list(c.embeds.shape[1:]) != want or c.embeds.shape[0] != len(c.ends):
                raise ValueError(
                    f"prompt_schedule.{name} is {list(c.embeds.shape)} for {len(c.ends)} entries; "
                    f"expected [{len(c.ends)}, {want[0]}, {want[1]}]"
                )
            if self.text_time and (c.pooled is None or c.pooled.shape[0] != len(c.ends)):
                raise ValueError(f"prompt_schedule.{name} needs one pooled embedding per entry on an SDXL UNet")

    def _check_added_conditions(self, request: DenoiseRequest) -> None:
        """SDXL's UNet needs pooled embeddings and 6 time ids whose embedding fits its ``add_embedding``
        (``StableDiffusionXLPipeline._get_add_time_ids``' check); other UNets take none."""
        given = [
            name
            for name in (
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "add_time_ids",
                "negative_add_time_ids",
            )
            if getattr(request, name) is not None
        ]
        if not self.text_time:
            if given:
                raise ValueError(f"this UNet takes no SDXL micro-conditioning, got {given}")
            return
        needed = ["pooled_prompt_embeds", "add_time_ids"]
        if request.guidance_scale > 1.0:
            needed += ["negative_pooled_prompt_embeds", "negative_add_time_ids"]
        missing = [name for name in needed if getattr(request, name) is None]
        if missing:
            raise ValueError(f"an SDXL UNet needs {missing}")
        cfg = self.unet.config
        for name in needed:
            value = getattr(request, name)
            if name.endswith("time_ids"):
                if len(value) != 6:
                    raise ValueError(f"{name} must have 6 numbers, got {len(value)}")
            elif value.ndim != 1:
                raise ValueError(f"{name} must be one vector [pooled], got {list(value.shape)}")
        width = cfg.addition_time_embed_dim * 6 + request.pooled_prompt_embeds.shape[-1]
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"pooled embeddings ({request.pooled_prompt_embeds.shape[-1]}) and 6 time ids x "
                f"{cfg.addition_time_embed_dim} make {width} features; the UNet expects "
                f"{cfg.projection_class_embeddings_input_dim}"
            )

    def _check_conditioning(self, cond: ImageConditioning, shape: tuple[int, ...]) -> None:
        """The conditioning's tensors fit this request's size and this UNet (a wiring error otherwise)."""
        latent, mask = list(shape), [1, 1, *shape[2:]]
        expected = {"noise": latent, "image_latents": latent, "masked_image_latents": latent, "mask": mask}
        for name, want in expected.items():
            t = getattr(cond, name)
            if t is not None and list(t.shape) != want:
                raise ValueError(f"conditioning.{name} is {list(t.shape)}; this request needs {want}")
        needs = []
        if not cond.inpaint or self.unet_in_channels == self.latent_channels or cond.strength < 1.0:
            needs.append("image_latents")  # to start from, or to blend with
        if self.unet_in_channels != self.latent_channels:
            needs += ["mask", "masked_image_latents"]  # encode_conditioning(unet_in_channels=9) makes them
        missing = [name for name in needs if getattr(cond, name) is None]
        if missing:
            raise ValueError(
                f"conditioning lacks {missing} for a {self.unet_in_channels}-channel UNet "
                f"({'inpainting' if cond.inpaint else 'img2img'}, strength {cond.strength})"
            )

    def prepare_prompt_embeds(self, request: DenoiseRequest) -> torch.Tensor:
        """The job's UNet ``encoder_hidden_states``: ``[2, tokens, hidden]`` with guidance, else ``[1, ...]``.

        ``StableDiffusionPipeline.__call__`` right after ``encode_prompt``: with classifier-free
        guidance (``guidance_scale > 1``), ``torch.cat([negative_prompt_embeds, prompt_embeds])``,
        the unconditional row first.
        """
        pos = request.prompt_embeds.to(self.device, self.dtype)  # [tokens, hidden]
        if request.guidance_scale <= 1.0:
            return pos[None]
        neg = request.negative_prompt_embeds.to(self.device, self.dtype)  # [tokens, hidden]
        return torch.stack([neg, pos])

    def prepare_row_conditioning(self, request: DenoiseRequest, scheduler, calls: int) -> RowConditioning:
        """The job's rows and, per UNet call, each row's schedule entry (A1111's ``reconstruct_cond_batch``).

        Call i is sampling step ``i * steps // len(scheduler.timesteps)``: itself for a first-order
        sampler, and a sampler with more calls than steps (Heun's and DPM2's two per step, PLMS's
        extra first one) spreads its calls over the steps. Calls count from the job's first one
        (img2img too, as in A1111). Each row takes the first entry whose ``end_at_step`` is at
        least the step.
        """
        schedule = request.prompt_schedule
        rows = [schedule.negative] if self.schedule_rows(request) > len(schedule.parts) else []
        rows += schedule.parts
        full = len(scheduler.timesteps)  # every call of the full schedule (img2img runs its last ones)
        entries = tuple(tuple(c.entry_at(i * request.steps // full) for c in rows) for i in range(calls))
        pooled = None
        if self.text_time:
            pooled = tuple(c.pooled.to(self.device, self.dtype) for c in rows)
        return RowConditioning(
            embeds=tuple(c.embeds.to(self.device, self.dtype) for c in rows),
            pooled=pooled,
            entries=entries,
            weights=schedule.weights if schedule.composable else None,
        )

    def prepare_added_conditions(
        self, request: DenoiseRequest, rows: int, row_conditioning: RowConditioning | None = None
    ) -> dict[str, torch.Tensor]:
        """SDXL's ``added_cond_kwargs`` for the job's rows: ``text_embeds`` ``[rows, pooled]`` and
        ``time_ids`` ``[rows, 6]``.

        ``StableDiffusionXLPipeline.__call__``: ``add_time_ids`` as a tensor in the prompt
        embeddings' dtype; with guidance, negatives first (``torch.cat([negative, positive])``).
        """
        pooled = request.pooled_prompt_embeds.to(self.device, self.dtype)[None]  # [1, pooled]
        time_ids = torch.tensor([request.add_time_ids], dtype=self.dtype, device=self.device)  # [1, 6]
        if row_conditioning is not None:  # text_embeds follow the schedule (_step); time ids: negative row first
            parts = len(request.prompt_schedule.parts)
            ids = [request.negative_add_time_ids] * (rows - parts) + [request.add_time_ids] * parts
            return {
                "text_embeds": torch.cat(row_conditioning.pooled_at(0)),  # [rows, pooled]
                "time_ids": torch.tensor(ids, dtype=self.dtype, device=self.device),  # [rows, 6]
            }
        if rows == 2:
            neg_pooled = request.negative_pooled_prompt_embeds.to(self.device, self.dtype)[None]
            neg_time_ids = torch.tensor([request.negative_add_time_ids], dtype=self.dtype, device=self.device)
            pooled, time_ids = torch.cat([neg_pooled, pooled]), torch.cat([neg_time_ids, time_ids])
        return {"text_embeds": pooled, "time_ids": time_ids}

    def retrieve_timesteps(self, scheduler, steps: int) -> torch.Tensor:
        """``scheduler.set_timesteps(steps)``, then its timesteps ``[num_ticks]``.

        diffusers' ``retrieve_timesteps`` (``pipeline_stable_diffusion.py``), without custom
        timesteps or sigmas.
        """
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps

    @staticmethod
    def get_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
        """The last ``int(steps * strength)`` of the scheduler's timesteps, and the scheduler told so.

        ``StableDiffusionImg2ImgPipeline.get_timesteps`` (the inpainting pipeline's is a copy):
        the first ``t_start * scheduler.order`` timesteps are skipped, and ``set_begin_index``
        (where the scheduler has it) makes its step index start there.
        """
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps

    @staticmethod
    def _generator(request: DenoiseRequest) -> torch.Generator:
        """The image's CPU generator (the pipelines' ``generator=torch.Generator().manual_seed(seed)``).

        Text-to-image: freshly seeded (``prepare_latents`` draws ``x_T`` from it next). Image-
        conditioned: where the VAE stage left it after its draws (see ``conditioning``).
        """
        if request.conditioning is None:
            return torch.Generator("cpu").manual_seed(request.seed)
        generator = torch.Generator("cpu")
        generator.set_state(request.conditioning.generator_state)
        return generator

    def prepare_latents(
        self,
        scheduler,
        shape: tuple[int, int, int, int],
        generator: torch.Generator,
        timesteps: torch.Tensor,
        cond: ImageConditioning | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(x_T, noise, image_latents)``, each ``[1, 4, h, w]``; the last two None for text-to-image.

        - Text-to-image, ``StableDiffusionPipeline.prepare_latents``: ``randn(shape, generator)
          * init_noise_sigma``, drawn on the CPU so a seed gives the same image on any device.
        - img2img, ``StableDiffusionImg2ImgPipeline.prepare_latents``: ``add_noise(image_latents,
          noise, timesteps[:1])``.
        - Inpainting, ``StableDiffusionInpaintPipeline.prepare_latents``: the same, or
          ``noise * init_noise_sigma`` at strength 1 (``is_strength_max``).

        An image-conditioned job's noise and image latents come from the conditioning: the VAE
        stage encoded the image and drew the noise from this generator, in the pipelines' order.
        """
        if cond is None:
            x_T = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
            return x_T * scheduler.init_noise_sigma, None, None
        noise = cond.noise.to(self.device, self.dtype)
        image_latents = None
        if cond.image_latents is not None:
            image_latents = cond.image_latents.to(self.device, self.dtype)
        if cond.inpaint and cond.strength == 1.0:
            x_T = noise * scheduler.init_noise_sigma
        else:
            x_T = scheduler.add_noise(image_latents, noise, timesteps[:1])
        return x_T, noise, image_latents

    def prepare_mask_latents(
        self,
        cond: ImageConditioning | None,
        shape: tuple[int, int, int, int],
        rows: int,
        noise: torch.Tensor | None,
        image_latents: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The job's mask tensors (``DenoiseJob`` fields), by UNet kind.

        - A 9-channel (inpainting) UNet reads ``[x_t, mask, masked_image_latents]``:
          ``unet_extra``, as ``StableDiffusionInpaintPipeline.prepare_mask_latents`` makes them
          (duplicated for the ``rows`` guidance rows). Text-to-image there: mask 1 (repaint
          everything) and masked-image latents 0.
        - Inpainting on a 4-channel UNet blends after every step (the loop's ``init_mask`` and
          ``init_latents_proper``): ``blend_mask``, ``image_latents``, ``noise``.
        """
        tensors: dict[str, torch.Tensor] = {}
        if self.unet_in_channels == self.latent_channels:
            if cond is not None and cond.inpaint:
                tensors = {
                    "blend_mask": cond.mask.to(self.device, self.dtype),  # [1, 1, h, w]
                    "image_latents": image_latents,
                    "noise": noise,
                }
            return tensors
        if cond is not None:
            mask, masked = cond.mask, cond.masked_image_latents
        else:  # text-to-image on an inpainting UNet: repaint everything, nothing to keep
            mask, masked = torch.ones(1, 1, *shape[2:]), torch.zeros(shape)
        extra = torch.cat([mask, masked], dim=1).to(self.device, self.dtype)  # [1, 5, h, w]
        tensors["unet_extra"] = torch.cat([extra] * rows)  # [rows, 5, h, w], as CFG duplicates
        return tensors

    @staticmethod
    def prepare_extra_step_kwargs(scheduler, generator: torch.Generator, eta: float = 0.0) -> dict:
        """``eta`` and ``generator`` for the schedulers whose ``step`` takes them.

        The pipelines' ``prepare_extra_step_kwargs``: eta (DDIM's η) is 0, as their default.
        """
        params = inspect.signature(scheduler.step).parameters
        step_kwargs: dict = {}
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        return step_kwargs

    def _check_room(self, tenant: str, n: int) -> None:
        mine = self.waiting.depth(tenant)
        if mine + n > self.max_queued:
            raise QueueFullError(mine, self.max_queued, self.retry_after_s())
        if len(self.waiting) + n > self.max_queued_total:
            raise QueueFullError(len(self.waiting), self.max_queued_total, self.retry_after_s())

    def submit(self, requests: list[DenoiseRequest]) -> list[DenoiseJob]:
        """Queue all of ``requests`` (one tenant's) or none of them (raises ``QueueFullError``)."""
        tenants = {r.tenant for r in requests}
        if len(tenants) > 1:
            raise ValueError(f"one submit carries one tenant's requests, got {sorted(tenants)}")
        tenant = tenants.pop() if tenants else ""
        if self.residency is not None:
            for r in requests:
                self.residency.check([key for key, _ in r.adapters])  # never a wait for the impossible
        with self._lock:
            self._check_room(tenant, len(requests))
        jobs = [self.prepare(r) for r in requests]
        with self._lock:
            self._check_room(tenant, len(jobs))
            for job in jobs:
                self.waiting.push(tenant, job, cost=job.rows * len(job.timesteps), weight=requests[0].tenant_weight)
        return jobs

    def cancel(self, jobs: list[DenoiseJob]) -> None:
        """Drop jobs; a running one leaves its batch at the next tick."""
        with self._lock:
            for job in jobs:
                job.cancelled = True
                self.waiting.remove(job)

    def retry_after_s(self) -> float:
        """A rough wait for a queue slot: the time to drain the current work at the measured tick rate."""
        per_tick = self.tick_seconds / self.ticks_run if self.ticks_run else 0.5
        work = sum(len(j.timesteps) - j.index for j in itertools.chain(self.active, self.waiting))
        return max(1.0, per_tick * work / max(1, len(self.active)))

    def pending_steps(self) -> int:
        """UNet steps still to run for every queued and running image (the autoscaling signal)."""
        with self._lock:
            waiting = list(self.waiting)
        return sum(len(j.timesteps) - j.index for j in itertools.chain(self.active, waiting))

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def _admit(self) -> list[DenoiseJob]:
        """Move waiting jobs into the batch, in fair order, while rows are free; return jobs that failed.

        Without a residency, strictly in order. With one, see the module docstring.
        """
        with self._lock:
            rows = sum(j.rows for j in self.active)
            if self.residency is None:
                blocked = False  # a job did not fit: later ones go only for a tenant below its share
                for job in self.waiting.in_order():
                    if blocked or rows + job.rows > self.max_rows_per_tick:
                        room = self._make_room(job, rows)
                        if room is None:
                            blocked = True
                            continue
                        rows = room
                    self.waiting.take(job)
                    job.slots = job.request.adapters
                    self._activate(job)
                    rows += job.rows
                return []
            order = self.waiting.in_order()
            self._want(order)
            now = self.clock()
            failed: list[DenoiseJob] = []
            memory_blocked = False
            blocked = False  # a job did not fit: later ones go only for a tenant below its share (_make_room)
            for job in order:
                over = blocked or rows + job.rows > self.max_rows_per_tick
                if over and self._make_room(job, rows, dry_run=True) is None:
                    blocked = True
                    continue
                keys = job.adapter_keys
                try:
                    slots = self.residency.try_pin(keys, only_if_pinned=memory_blocked) if keys else []
                except Exception as e:  # the adapter failed to load, or can never fit: the job fails
                    self.waiting.remove(job)
                    job.error, job.finished_at = e, now
                    failed.append(job)
                    continue
                if slots is None:
                    if job.adapter_wait_since is None:
                        job.adapter_wait_since = now
                    memory_blocked = memory_blocked or self.residency.blocked(keys)
                    continue
                if over:  # its adapters are pinned: now pause the jobs that make its room
                    rows = self._make_room(job, rows)
                self.waiting.take(job)
                job.pinned = keys
                job.slots = tuple((slot, float(w)) for slot, (_, w) in zip(slots, job.request.adapters, strict=True))
                if keys and self.on_adapter_wait is not None and not job.pauses:
                    self.on_adapter_wait(0.0 if job.adapter_wait_since is None else now - job.adapter_wait_since)
                self._activate(job)
                rows += job.rows
            return failed

    def _activate(self, job: DenoiseJob) -> None:
        job.admitted = next(self._admissions)
        job.ready_tick = self.ticks_run
        self.active.append(job)

    def _shares(self, arriving: str | None = None) -> tuple[dict[str, int], Callable[[str], float]]:
        """Rows each tenant holds in the batch, and each tenant's fair share of ``max_rows_per_tick`` (its weight
        over the weights of the tenants with work: running, waiting, or ``arriving``). Called with the lock held."""
        held: dict[str, int] = {}
        for j in self.active:
            held[j.request.tenant] = held.get(j.request.tenant, 0) + j.rows
        with_work = set(held) | set(self.waiting.depths())
        if arriving is not None:
            with_work.add(arriving)
        total = sum(self.waiting.weight(t) for t in with_work)

        def share(tenant: str) -> float:
            return self.max_rows_per_tick * self.waiting.weight(tenant) / total

        return held, share

    def _make_room(self, job: DenoiseJob, rows: int, dry_run: bool = False) -> int | None:
        """Room for ``job`` past a job that did not fit, for a tenant below its fair share of the rows: the rows
        still running once enough running jobs of tenants above their share are paused (each such tenant keeps
        at least its share; newest first), or None (its tenant is not below its share, ``preempt`` is off, or
        pausing cannot free enough rows: then nothing is paused). ``dry_run``: say so, pausing nothing. Called with
        the lock held."""
        if not self.preempt:
            return None
        tenant = job.request.tenant
        held, share = self._shares(tenant)
        if held.get(tenant, 0) + job.rows > share(tenant):
            return None
        victims, freed = [], 0
        for victim in sorted(self.active, key=lambda j: j.admitted, reverse=True):
            if rows - freed + job.rows <= self.max_rows_per_tick:
                break
            owner = victim.request.tenant
            if owner != tenant and held[owner] - victim.rows >= share(owner):
                victims.append(victim)
                held[owner] -= victim.rows
                freed += victim.rows
        if rows - freed + job.rows > self.max_rows_per_tick:
            return None
        if dry_run:
            return rows - freed
        for victim in victims:
            self.active = [j for j in self.active if j is not victim]
            self._leave([victim])
            victim.slots = ()
            victim.pauses += 1
            self.pauses += 1
            self.waiting.push_front(victim.request.tenant, victim)
        return rows - freed

    def _want(self, order: list[DenoiseJob]) -> None:
        """Tell the residency the adapters of the jobs that would fill the next two ticks, next first."""
        wanted, rows = [], 0
        for job in order:
            if rows >= 2 * self.max_rows_per_tick:
                break
            rows += job.rows
            if job.request.adapters:
                wanted.append(job.adapter_keys)
        self.residency.want(wanted)

    def _leave(self, jobs: list[DenoiseJob]) -> None:
        """Jobs leave the batch: their adapters are unpinned (no forward reads them any more)."""
        for job in jobs:
            if job.pinned:
                self.residency.release(job.pinned)
                job.pinned = ()

    @property
    def runnable(self) -> bool:
        """Is there a job in the batch? (Waiting jobs may all wait for adapter loads.)"""
        return bool(self.active)

    def _skipped(self, job: DenoiseJob) -> int:
        """Ticks run since ``job`` last stepped (or was admitted) without it: other buckets' ticks."""
        return self.ticks_run - max(job.last_tick + 1, job.ready_tick)

    def _below_share(self) -> set[str]:
        """The tenants whose running jobs hold fewer rows than their fair share (``preempt`` off: none)."""
        if not self.preempt:
            return set()
        with self._lock:  # submit() may add a tenant's queue meanwhile
            held, share = self._shares()
        return {tenant for tenant, rows in held.items() if rows < share(tenant)}

    def _pick_bucket(self, below: set[str]) -> tuple[int, int, int]:
        """The bucket of the job that has waited longest since its last step: buckets take turns. The jobs of the
        ``below`` tenants (below their fair share of the rows) go first (see the module docstring), unless a job has
        been skipped ``MAX_TICK_SKIPS`` ticks in a row: then its bucket goes."""
        first = min(self.active, key=lambda j: (j.last_tick, j.id))
        if not self.preempt or len({j.bucket for j in self.active}) == 1:
            return first.bucket
        starved = max(self.active, key=lambda j: (self._skipped(j), -j.id))
        if self._skipped(starved) >= self.MAX_TICK_SKIPS:
            return starved.bucket
        mine = [j for j in self.active if j.request.tenant in below]
        return min(mine, key=lambda j: (j.last_tick, j.id)).bucket if mine else first.bucket

    def _tick_jobs(self, bucket: tuple[int, int, int], below: set[str]) -> list[DenoiseJob]:
        """The running jobs of ``bucket`` that this tick steps: all of them, unless it carries an image of a
        ``below`` tenant and more than ``protected_tick_rows`` rows: then the ``below`` tenants' jobs, any job
        skipped ``MAX_TICK_SKIPS`` ticks in a row, and others, longest waiting first, while they fit."""
        jobs = [j for j in self.active if j.bucket == bucket]
        cap = self.protected_tick_rows
        if not cap or sum(j.rows for j in jobs) <= cap:
            return jobs
        mine = {j.id for j in jobs if j.request.tenant in below}
        if not mine or len(mine) == len(jobs):
            return jobs
        chosen = {j.id for j in jobs if j.id in mine or self._skipped(j) >= self.MAX_TICK_SKIPS}
        rows = sum(j.rows for j in jobs if j.id in chosen)
        for j in sorted(jobs, key=lambda j: (-self._skipped(j), j.last_tick, j.id)):
            if j.id not in chosen and rows + j.rows <= cap:
                chosen.add(j.id)
                rows += j.rows
        return [j for j in jobs if j.id in chosen]

    # -- one step -------------------------------------------------------------

    @torch.inference_mode()
    def tick(self) -> list[DenoiseJob]:
        """Run one UNet forward for one bucket; return the jobs that finished (or failed)."""
        finished = [j for j in self.active if j.cancelled]
        self.active = [j for j in self.active if not j.cancelled]
        self._leave(finished)
        finished += self._admit()
        if not self.active:
            return finished
        below = self._below_share()  # once a tick: for its bucket and its rows
        jobs = self._tick_jobs(self._pick_bucket(below), below)
        start = self.clock()
        try:
            self._step(jobs, start)
        except Exception as e:  # a failed forward fails its jobs, never the loop
            for j in jobs:
                j.error = e
                j.finished_at = self.clock()
            self.active = [j for j in self.active if j not in jobs]
            self._leave(jobs)
            return finished + jobs
        now = self.clock()
        rows = sum(j.rows for j in jobs)
        for j in jobs:
            j.step_seconds += now - start
        self.ticks_run += 1
        self.rows_run += rows
        self.tick_seconds += now - start
        if self.on_tick is not None:
            self.on_tick(rows, now - start)
        done = [j for j in jobs if j.done]
        if done:
            self._hand_over(done, now)
        self.active = [j for j in self.active if not j.done]
        self._leave(done)
        return finished + done

    def _hand_over(self, done: list[DenoiseJob], now: float) -> None:
        """Finished latents leave the batch: one host sync per tick checks them all for NaN/inf.

        Never a silent black image: a job whose latents are not finite fails. Each keeps its
        own copy of its latents (not a view of the tick's batch).
        """
        finite = torch.stack([torch.isfinite(j.x_t).all() for j in done]).tolist()  # the one sync
        for j, ok in zip(done, finite, strict=True):
            j.finished_at = now
            j.x_t = j.x_t.clone()
            if not ok:
                names = tuple(str(key) for key, _ in j.request.adapters)
                j.error = NonFiniteLatentsError(names, len(j.timesteps))

    def forward_unet(
        self, x_in: torch.Tensor, t_in: torch.Tensor, context: torch.Tensor, added: dict | None, rows, eager=False
    ) -> torch.Tensor:
        """The UNet's noise prediction for a tick's rows; ``rows``: each row's adapters (None: none at all).
        ``eager``: never through ``step_graphs`` (a tick with IP-Adapter image rows: no captured graph has them)."""
        if self.step_graphs is not None and not eager:
            return self.step_graphs.forward(x_in, t_in, context, added, rows)
        kwargs: dict = {"encoder_hidden_states": context, "return_dict": False}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        if rows is not None:
            with self.lora.routed(rows):
                return self.unet(x_in, t_in, **kwargs)[0]
        return self.unet(x_in, t_in, **kwargs)[0]

    def _step(self, jobs: list[DenoiseJob], start: float) -> None:
        """One UNet forward over ``jobs``' rows, then each scheduler kind's step over its jobs.

        No host sync: step indices are Python ints, coefficients are gathered on the device
        (``scheduler_steps``); only ``PerRequestStep`` jobs call diffusers' objects, syncs included.
        """
        for j in jobs:
            if j.started_at is None:
                j.started_at = start
        groups = self._group_by_kind(jobs)
        scaled: list[torch.Tensor] = [None] * len(jobs)  # type: ignore[list-item]
        for kind, members in groups:
            x_t = torch.cat([jobs[m].x_t for m in members])  # [n, c, h, w]
            x = kind.scale_model_input([jobs[m].schedule for m in members], [jobs[m].index for m in members], x_t)
            for m, x_m in zip(members, x.split(1), strict=True):
                scaled[m] = x_m
        x_in = []
        for j, x in zip(jobs, scaled, strict=True):
            x = x.expand(j.rows, -1, -1, -1)  # [rows, c, h, w]: CFG's two rows
            if j.unet_extra is not None:  # diffusers scales x_t alone, then concatenates
                x = torch.cat([x, j.unet_extra], dim=1)  # [rows, 2c + 1, h, w]
            x_in.append(x)
        x_in = torch.cat(x_in)  # [sum rows, c, h, w]
        t_in = torch.cat([j.unet_timesteps[j.index].expand(j.rows) for j in jobs])  # [sum rows]
        # [sum rows, tokens, hidden]; a scheduled job's rows at its current call (views: the cat is the one copy)
        context = torch.cat([c for j in jobs for c in self._context(j)])
        added = None
        if self.text_time:
            added = {
                "text_embeds": torch.cat([p for j in jobs for p in self._pooled(j)]),  # [sum rows, pooled]
                "time_ids": torch.cat([j.added_cond["time_ids"] for j in jobs]),  # [sum rows, 6]
            }
        rows = None
        if self.lora is not None and any(j.slots for j in jobs):
            # Both guidance rows of a request carry its adapters, as in diffusers.
            rows = [j.slots for j in jobs for _ in range(j.rows)]
        if self.ip_adapter is not None:
            starts = itertools.accumulate([j.rows for j in jobs], initial=0)
            images = [(start, j.ip_image) for start, j in zip(starts, jobs, strict=False) if j.ip_image is not None]
            with self.ip_adapter.routed(images):
                eps_all = self.forward_unet(x_in, t_in, context, added, rows, eager=bool(images))
        else:
            eps_all = self.forward_unet(x_in, t_in, context, added, rows)
        guided: list[torch.Tensor] = []
        for j, eps in zip(jobs, eps_all.split([j.rows for j in jobs]), strict=True):
            if j.row_conditioning is not None and j.row_conditioning.weights is not None:
                eps = composable_guidance(eps, j.row_conditioning.weights, j.request.guidance_scale)
            elif j.cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + j.request.guidance_scale * (eps_text - eps_uncond)
            guided.append(eps)  # [1, c, h, w]
        for kind, members in groups:
            schedules, indices = [jobs[m].schedule for m in members], [jobs[m].index for m in members]
            eps = torch.cat([guided[m] for m in members])  # [n, c, h, w]
            x_t = torch.cat([jobs[m].x_t for m in members])
            x_next = kind.step(schedules, indices, eps, x_t)
            for m, x_m in zip(members, x_next.split(1), strict=True):
                j = jobs[m]
                if j.blend_mask is not None:
                    # Keep the unmasked region on the init image's trajectory: noised to the next timestep.
                    init = j.image_latents
                    if j.index < len(j.timesteps) - 1:
                        init = kind.add_noise(j.schedule, init, j.noise, j.index + 1)
                    x_m = (1 - j.blend_mask) * init + j.blend_mask * x_m
                j.x_t = x_m
                j.index += 1
                j.last_tick = self.ticks_run

    @staticmethod
    def _context(job: DenoiseJob) -> list[torch.Tensor]:
        """The job's ``encoder_hidden_states`` rows for its current call."""
        if job.row_conditioning is None:
            return [job.context]
        return job.row_conditioning.context(job.index)

    @staticmethod
    def _pooled(job: DenoiseJob) -> list[torch.Tensor]:
        """The job's SDXL ``text_embeds`` rows for its current call."""
        if job.row_conditioning is None:
            return [job.added_cond["text_embeds"]]
        return job.row_conditioning.pooled_at(job.index)

    @staticmethod
    def _group_by_kind(jobs: list[DenoiseJob]) -> list[tuple[SchedulerStep, list[int]]]:
        """Positions of ``jobs`` by scheduler kind, in order of first appearance."""
        groups: dict[SchedulerStep, list[int]] = {}
        for m, j in enumerate(jobs):
            groups.setdefault(j.schedule.kind, []).append(m)
        return list(groups.items())

    # -- progress of a request (async jobs) -------------------------------------

    def progress(self, jobs: list[DenoiseJob]) -> dict:
        """Where a request (its images' ``jobs``) stands: queue position, step of N, an ETA.

        ``{"position": int | None, "step": int, "steps": int, "eta_s": float | None}``.
        ``position`` (queued only: no image has started) counts the waiting images that
        go before the request's first one (0 = next). ``step`` is the slowest image's,
        in the request's own steps (a scheduler with one extra timestep is scaled back).

        The ETA is an estimate from the measured mean tick time (``tick_seconds /
        ticks_run``; None before the first tick): a running request needs its remaining
        ticks, one per turn of the shape buckets; a queued one first waits for the work
        ahead of it (the running images' remaining rows x steps and the waiting ones
        before it) to drain at ``max_rows_per_tick`` rows per tick. It ignores work that
        arrives later and cuts in ahead (fair queuing lets a new tenant do that).
        """
        with self._lock:
            positions = [self.waiting.position(j) for j in jobs]
            queued = None not in positions
            position = min(positions) if queued else None
            ahead = [j for j in self.waiting if queued and self.waiting.position(j) < position]
            active = list(self.active)
        steps = jobs[0].request.steps
        step = min(j.index * steps // len(j.timesteps) for j in jobs)
        if not self.ticks_run:
            eta_s = None
        else:
            per_tick = self.tick_seconds / self.ticks_run
            buckets = len({j.bucket for j in active} | {j.bucket for j in jobs})
            remaining = max(len(j.timesteps) - j.index for j in jobs)
            eta_s = per_tick * buckets * remaining
            if queued:
                work_ahead = sum(j.rows * (len(j.timesteps) - j.index) for j in itertools.chain(active, ahead))
                eta_s += per_tick * work_ahead / self.max_rows_per_tick
        return {"position": position, "step": step, "steps": steps, "eta_s": eta_s}
