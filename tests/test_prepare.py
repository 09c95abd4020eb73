"""A job's preparation, step by step, against the diffusers function each step mirrors.

``StepScheduler.prepare`` is ``check_inputs``, ``prepare_prompt_embeds``, ``retrieve_timesteps``,
``get_timesteps``, ``prepare_latents``, ``prepare_mask_latents`` and ``prepare_extra_step_kwargs``;
each result is compared, bit for bit, with what ``StableDiffusionPipeline`` /
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline`` (diffusers 0.42) make from
the same inputs and seeds. The pipelines' methods run on a namespace holding only what they read.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from deployments.engine import models
from deployments.engine.conditioning import ImageConditioning, ImageInputError, latent_mask
from deployments.engine.schedulers import SCHEDULER_NAMES, SchedulerFactory
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler

SIZE, STEPS, CPU = 64, 7, torch.device("cpu")
LATENT = (1, 4, SIZE // 8, SIZE // 8)


class FakeUNet(torch.nn.Module):
    """What preparation reads of a UNet: its channels, device and dtype."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(in_channels=in_channels, out_channels=4)


@pytest.fixture(scope="module")
def factory(tiny_dir):
    info = models.read_model_info("builtin:tiny-sd", tiny_dir)
    return SchedulerFactory(info.scheduler_class, info.scheduler_config)


def step_scheduler(factory, in_channels: int = 4) -> StepScheduler:
    return StepScheduler(FakeUNet(in_channels), factory, vae_scale_factor=8)


def pipe(scheduler):
    """The attributes the pipelines' preparation methods read."""
    return types.SimpleNamespace(scheduler=scheduler, vae_scale_factor=8)


def request(*, scheduler="default", guidance_scale=7.5, seed=0, conditioning=None, tokens=77, neg_tokens=77, size=SIZE):
    g = torch.Generator().manual_seed(100)
    pos, neg = torch.randn(tokens, 32, generator=g), torch.randn(neg_tokens, 32, generator=g)
    return DenoiseRequest(pos, neg, size, size, STEPS, guidance_scale, seed, scheduler, conditioning=conditioning)


def conditioning(strength: float, *, inpaint: bool, noise_seed: int = 11, masked: bool = False) -> ImageConditioning:
    """What ``encode_conditioning`` hands over: image latents, a pixel mask made latent-size, noise drawn from
    the image's generator (whose state after the draw travels along)."""
    image_latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn(LATENT, generator=generator)
    return ImageConditioning(
        strength,
        noise,
        generator.get_state(),
        image_latents,
        mask=latent_mask(pixel_mask(), 8) if inpaint else None,
        masked_image_latents=torch.randn(LATENT, generator=torch.Generator().manual_seed(4)) if masked else None,
    )


def pixel_mask() -> torch.Tensor:
    m = torch.zeros(1, 1, SIZE, SIZE)  # [1, 1, H, W], 1 = repaint; edges inside 8-pixel latent cells
    m[..., 12:44, 8:36] = 1.0
    return m


def diffusers_timesteps(factory, name, strength=None):
    """``retrieve_timesteps``, then (image-conditioned) ``get_timesteps``, as the pipelines call them."""
    scheduler = factory.create(name)
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, CPU)
    if strength is not None:
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe(scheduler), STEPS, strength, CPU)
    return scheduler, timesteps


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("strength", [None, 0.3, 0.75, 1.0])
def test_timesteps(factory, name, strength):
    steps = step_scheduler(factory)
    ours = factory.create(name)
    timesteps = steps.retrieve_timesteps(ours, STEPS)
    if strength is not None:
        timesteps = steps.get_timesteps(ours, STEPS, strength)
    theirs, expected = diffusers_timesteps(factory, name, strength)
    assert torch.equal(timesteps, expected)
    assert getattr(ours, "begin_index", None) == getattr(theirs, "begin_index", None)
    if strength is not None and strength < 1 and hasattr(ours, "begin_index"):
        assert ours.begin_index > 0  # the scheduler starts part-way: the comparison above is not of Nones


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_text_to_image(factory, name, guidance_scale):
    req = request(scheduler=name, guidance_scale=guidance_scale, seed=5)
    job = step_scheduler(factory).prepare(req)
    scheduler, timesteps = diffusers_timesteps(factory, name)
    generator = torch.Generator().manual_seed(5)
    latents = StableDiffusionPipeline.prepare_latents(pipe(scheduler), 1, 4, SIZE, SIZE, torch.float32, CPU, generator)
    extra = StableDiffusionPipeline.prepare_extra_step_kwargs(pipe(scheduler), generator, 0.0)
    assert torch.equal(job.timesteps, timesteps)
    assert torch.equal(job.x_t, latents)
    assert_same_step_kwargs(job.step_kwargs, extra)
    # encode_prompt's outputs, stacked as the pipeline does for guidance: the unconditional row first.
    want = torch.cat([req.negative_prompt_embeds[None], req.prompt_embeds[None]]) if guidance_scale > 1 else None
    assert torch.equal(job.context, want if want is not None else req.prompt_embeds[None])
    assert job.unet_extra is job.blend_mask is job.noise is job.image_latents is None


def assert_same_step_kwargs(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert ours.get("eta") == theirs.get("eta")
    if "generator" in theirs:  # same generator state: the scheduler's later draws match
        assert torch.equal(ours["generator"].get_state(), theirs["generator"].get_state())


@pytest.mark.parametrize("name", ["default", "ddim", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img(factory, name, strength):
    cond = conditioning(strength, inpaint=False)
    job = step_scheduler(factory).prepare(request(scheduler=name, conditioning=cond))
    scheduler, timesteps = diffusers_timesteps(factory, name, strength)
    generator = torch.Generator().manual_seed(11)
    latents = StableDiffusionImg2ImgPipeline.prepare_latents(
        pipe(scheduler), cond.image_latents, timesteps[:1].repeat(1), 1, 1, torch.float32, CPU, generator
    )
    assert torch.equal(job.timesteps, timesteps)
    assert torch.equal(job.x_t, latents)
    assert_same_step_kwargs(
        job.step_kwargs, StableDiffusionPipeline.prepare_extra_step_kwargs(pipe(scheduler), generator, 0)
    )
    assert job.unet_extra is job.blend_mask is job.noise is None


@pytest.mark.parametrize("name", ["default", "euler", "euler_a"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_on_a_4_channel_unet(factory, name, strength):
    cond = conditioning(strength, inpaint=True)
    job = step_scheduler(factory).prepare(request(scheduler=name, conditioning=cond))
    scheduler, timesteps = diffusers_timesteps(factory, name, strength)
    generator = torch.Generator().manual_seed(11)
    latents, noise, image_latents = StableDiffusionInpaintPipeline.prepare_latents(
        pipe(scheduler),
        1,
        4,
        SIZE,
        SIZE,
        torch.float32,
        CPU,
        generator,
        image=cond.image_latents,
        timestep=timesteps[:1].repeat(1),
        is_strength_max=strength == 1.0,
        return_noise=True,
        return_image_latents=True,
    )
    assert torch.equal(job.timesteps, timesteps)
    assert torch.equal(job.x_t, latents)
    # The loop blends with these: the loop's init_latents_proper and init_mask (mask[:1]).
    assert torch.equal(job.noise, noise) and torch.equal(job.image_latents, image_latents)
    mask, _ = StableDiffusionInpaintPipeline.prepare_mask_latents(
        pipe(scheduler), pixel_mask(), image_latents, 1, SIZE, SIZE, torch.float32, CPU, generator, False
    )
    assert torch.equal(job.blend_mask, mask) and job.unet_extra is None
    assert_same_step_kwargs(
        job.step_kwargs, StableDiffusionPipeline.prepare_extra_step_kwargs(pipe(scheduler), generator, 0)
    )


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_mask_latents_of_a_9_channel_unet(factory, guidance_scale):
    cond = conditioning(1.0, inpaint=True, masked=True)
    job = step_scheduler(factory, in_channels=9).prepare(request(guidance_scale=guidance_scale, conditioning=cond))
    cfg = guidance_scale > 1
    mask, masked_image_latents = StableDiffusionInpaintPipeline.prepare_mask_latents(
        pipe(factory.create("default")),
        pixel_mask(),
        cond.masked_image_latents,
        1,
        SIZE,
        SIZE,
        torch.float32,
        CPU,
        None,
        cfg,
    )
    # The loop's torch.cat([latent_model_input, mask, masked_image_latents], dim=1), past x_t's channels.
    assert torch.equal(job.unet_extra, torch.cat([mask, masked_image_latents], dim=1))
    assert job.unet_extra.shape == (2 if cfg else 1, 5, SIZE // 8, SIZE // 8)
    assert job.blend_mask is None


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"size": 60}, ValueError, "multiples of 8, got 60x60"),
        ({"neg_tokens": 154}, ValueError, r"negative_prompt_embeds \[154, 32\] must have the shape"),
        ({"conditioning": conditioning(0.1, inpaint=False)}, ImageInputError, "runs no step"),
        ({"conditioning": conditioning(1.5, inpaint=False)}, ImageInputError, r"interval \(0, 1\]"),
        (
            {"conditioning": ImageConditioning(0.5, torch.zeros(1, 4, 4, 4), torch.Generator().get_state())},
            ValueError,
            r"conditioning.noise is \[1, 4, 4, 4\]; this request needs \[1, 4, 8, 8\]",
        ),
        (
            {"conditioning": ImageConditioning(0.5, torch.zeros(LATENT), torch.Generator().get_state())},
            ValueError,
            r"conditioning lacks \['image_latents'\]",
        ),
    ],
)
def test_check_inputs_refuses(factory, change, error, match):
    with pytest.raises(error, match=match):
        step_scheduler(factory).check_inputs(request(**change))


def test_check_inputs_accepts_and_gives_the_latent_shape(factory):
    steps = step_scheduler(factory)
    assert steps.check_inputs(request()) == LATENT
    # Guidance 1 uses no negative embedding: its shape does not matter.
    assert steps.check_inputs(request(guidance_scale=1.0, neg_tokens=154)) == LATENT
