"""img2img: the engine's images equal diffusers' StableDiffusionImg2ImgPipeline's, alone and in mixed batches.

Also the step-level batching rules image-conditioned jobs bring: strength sets the number of UNet steps
(and the cost the queue and the autoscaler see), bad strength fails at submit, and jobs whose prompt
embeddings have different token counts never share a forward.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engine.conditioning import (
    ConditioningInput,
    ImageConditioning,
    ImageInputError,
    encode_conditioning,
)
from deployments.engine.images import decode
from deployments.engine.step_scheduler import DenoiseRequest
from graph.image_decoding import load_image, preprocess_image, resolve_size

from engine_helpers import Engine

CASES = [
    # prompt, negative, scheduler, steps, strength, guidance, seed
    ("a watercolor cat", "blurry", "default", 6, 0.6, 7.5, 1),
    ("a watercolor cat", "", "default", 8, 0.3, 7.5, 2),
    ("an oil painting of a house", "ugly", "euler", 6, 0.75, 5.0, 3),
    ("an oil painting of a house", "", "euler", 5, 1.0, 7.5, 4),
    ("a pencil sketch", "", "euler_a", 6, 0.5, 6.0, 5),  # the scheduler draws from the generator
    ("a pencil sketch", "", "ddim", 5, 0.8, 1.0, 6),  # guidance 1: one UNet row
    ("a pencil sketch", "dark", "dpmpp_2m", 7, 0.7, 4.0, 7),
]


def init_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth picture with some texture, through a PNG file and ``load_image`` as an upload would go."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) + rng.integers(0, 24, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return load_image(buf.getvalue(), max_bytes=1 << 20, max_pixels=1 << 20)


def img2img_request(engine, image, prompt, negative="", *, scheduler, steps, strength, guidance_scale=7.5, seed=0):
    """What the ingress + VAE stage hand the denoiser for one img2img image."""
    width, height = resolve_size(image.size, None, None, min_side=8, max_side=1024)
    x = preprocess_image(image, width, height)
    ((cond,),) = encode_conditioning(
        engine.vae,
        [ConditioningInput(x, [seed], strength)],
        unet_in_channels=4,
        noise_dtype=torch.float32,
        per_image=True,
    )
    pos, neg = engine.prompts.encode_prompt([prompt, negative])
    return DenoiseRequest(pos, neg, height, width, steps, guidance_scale, seed, scheduler, conditioning=cond)


def run(engine, requests):
    """Submit together, tick to completion: (latents [n, 4, h, w], images [n, 3, H, W])."""
    jobs = engine.steps.submit(requests)
    while not engine.steps.idle:
        engine.steps.tick()
    latents = torch.cat([j.x_t for j in jobs])
    return latents, decode(engine.vae, latents, per_image=True)


def call_pipeline(pipe, **kwargs):
    """Run a diffusers pipeline; its final latents (before decode) and its images [n, 3, H, W]."""
    captured = {}

    def grab(pipe, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    images = pipe(**kwargs, output_type="pt", callback_on_step_end=grab).images
    return captured["latents"], images


def img2img_reference(engine, image, prompt, negative="", *, scheduler, steps, strength, guidance_scale=7.5, seed=0):
    from diffusers import StableDiffusionImg2ImgPipeline

    return call_pipeline(
        engine.pipeline(scheduler, StableDiffusionImg2ImgPipeline),
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny)


@pytest.mark.parametrize("prompt, negative, scheduler, steps, strength, guidance, seed", CASES)
def test_alone_equals_pipeline(engine, prompt, negative, scheduler, steps, strength, guidance, seed):
    image = init_image(seed=seed)
    kw = dict(scheduler=scheduler, steps=steps, strength=strength, guidance_scale=guidance, seed=seed)
    latents, images = run(engine, [img2img_request(engine, image, prompt, negative, **kw)])
    ref_latents, ref_images = img2img_reference(engine, image, prompt, negative, **kw)
    assert images.shape == ref_images.shape == (1, 3, 64, 64)
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    assert (images - ref_images).abs().max().item() <= 1e-4
    assert images.std().item() > 0.05  # a real picture, not a constant


def test_size_is_rounded_down_like_diffusers(engine):
    image = init_image(70, 61, seed=3)
    kw = dict(scheduler="euler", steps=4, strength=0.75, seed=9)
    _, images = run(engine, [img2img_request(engine, image, "a boat", **kw)])
    _, ref_images = img2img_reference(engine, image, "a boat", **kw)  # the pipeline sizes the image itself
    assert images.shape == ref_images.shape == (1, 3, 56, 64)
    assert (images - ref_images).abs().max().item() <= 1e-4


def test_the_init_image_matters(engine):
    kw = dict(scheduler="ddim", steps=4, strength=0.5, seed=1)
    a, _ = run(engine, [img2img_request(engine, init_image(seed=1), "a boat", **kw)])
    b, _ = run(engine, [img2img_request(engine, init_image(seed=2).rotate(90), "a boat", **kw)])
    assert (a - b).abs().max().item() > 0.05


def test_mixed_batch_with_text_to_image_equals_alone_and_pipeline(engine):
    cases = [CASES[0], CASES[2], CASES[4], CASES[5]]  # PNDM, Euler, Euler ancestral, one-row DDIM
    requests = [
        img2img_request(engine, init_image(seed=s), p, n, scheduler=sch, steps=k, strength=st, guidance_scale=g, seed=s)
        for p, n, sch, k, st, g, s in cases
    ]
    requests.insert(2, engine.request("a lighthouse", "fog", steps=6, seed=11, scheduler="euler"))
    requests.append(engine.request("a lighthouse", steps=5, seed=12))
    alone = [run(engine, [r])[0] for r in requests]
    before = engine.steps.ticks_run
    batched, images = run(engine, requests)
    # All six share every forward until they finish: as many ticks as the longest job has timesteps.
    assert engine.steps.ticks_run - before == 6
    for i in range(len(requests)):
        assert torch.equal(batched[i : i + 1], alone[i]), i
    img2img = [i for i, r in enumerate(requests) if r.conditioning is not None]
    for i, (p, n, sch, k, st, g, s) in zip(img2img, cases, strict=True):
        ref_latents, ref_images = img2img_reference(
            engine, init_image(seed=s), p, n, scheduler=sch, steps=k, strength=st, guidance_scale=g, seed=s
        )
        assert (batched[i : i + 1] - ref_latents).abs().max().item() <= 1e-4
        assert (images[i : i + 1] - ref_images).abs().max().item() <= 1e-4
    ref = engine.reference("a lighthouse", "fog", steps=6, seed=11, scheduler="euler")
    assert (images[2:3] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "scheduler, steps, strength, timesteps",
    [
        ("euler", 10, 0.5, 5),  # int(10 * 0.5) UNet steps
        ("ddim", 10, 0.25, 2),
        ("euler", 7, 1.0, 7),
        ("default", 10, 0.5, 6),  # PNDM runs one timestep more than steps, as in text-to-image
        ("default", 10, 1.0, 11),
    ],
)
def test_strength_sets_the_steps_and_their_cost(tiny, scheduler, steps, strength, timesteps):
    engine = Engine(tiny)
    request = img2img_request(engine, init_image(), "x", scheduler=scheduler, steps=steps, strength=strength)
    (job,) = engine.steps.submit([request])
    assert len(job.timesteps) == timesteps
    assert engine.steps.pending_steps() == timesteps  # the autoscaling signal counts real UNet steps
    while not engine.steps.idle:
        engine.steps.tick()
    assert engine.steps.ticks_run == timesteps and job.done


def _conditioning(strength: float) -> ImageConditioning:
    return ImageConditioning(
        strength=strength,
        noise=torch.zeros(1, 4, 8, 8),
        generator_state=torch.Generator().manual_seed(0).get_state(),
        image_latents=torch.zeros(1, 4, 8, 8),
    )


@pytest.mark.parametrize(
    "strength, steps, message",
    [
        (0.0, 5, r"strength: must be in the interval \(0, 1\], got 0.0"),
        (1.5, 5, r"strength: must be in the interval \(0, 1\], got 1.5"),
        (0.1, 5, "strength: strength 0.1 with 5 steps runs no step"),
    ],
)
def test_bad_strength_fails_at_submit_before_any_unet_work(engine, monkeypatch, strength, steps, message):
    monkeypatch.setattr(engine.steps, "unet", lambda *a, **k: pytest.fail("the UNet ran"))
    pos, neg = engine.prompts.encode_prompt(["x", ""])
    request = DenoiseRequest(pos, neg, 64, 64, steps, 7.5, 0, "ddim", conditioning=_conditioning(strength))
    with pytest.raises(ImageInputError, match=message):
        engine.steps.submit([request])
    assert engine.steps.idle and len(engine.steps.waiting) == 0


def test_conditioning_of_the_wrong_size_is_refused(engine):
    pos, neg = engine.prompts.encode_prompt(["x", ""])
    request = DenoiseRequest(pos, neg, 128, 128, 5, 7.5, 0, "ddim", conditioning=_conditioning(0.5))
    with pytest.raises(ValueError, match=r"conditioning.noise is \[1, 4, 8, 8\]; this request needs \[1, 4, 16, 16\]"):
        engine.steps.submit([request])


def test_different_token_counts_never_share_a_forward(engine):
    """Long prompts (77 tokens per chunk) make contexts of other lengths: separate buckets, same images."""
    short_pos, short_neg = engine.prompts.encode_prompt(["a cat", ""])
    extra_pos, extra_neg = engine.prompts.encode_prompt(["wearing a red hat", "blurry"])
    long_pos, long_neg = torch.cat([short_pos, extra_pos]), torch.cat([short_neg, extra_neg])  # [154, hidden]
    short = DenoiseRequest(short_pos, short_neg, 64, 64, 4, 7.5, 1, "ddim")
    long = DenoiseRequest(long_pos, long_neg, 64, 64, 4, 7.5, 2, "ddim")
    alone = [run(engine, [r])[0] for r in (short, long)]
    before = engine.steps.ticks_run
    jobs = engine.steps.submit([short, long])
    assert [j.bucket for j in jobs] == [(8, 8, 77), (8, 8, 154)]
    while not engine.steps.idle:
        engine.steps.tick()
    assert engine.steps.ticks_run - before == 8  # the two buckets took turns: 4 + 4 forwards
    assert all(j.done and j.error is None for j in jobs)
    assert torch.equal(jobs[0].x_t, alone[0]) and torch.equal(jobs[1].x_t, alone[1])
    assert (alone[0] - alone[1]).abs().max().item() > 0.05
