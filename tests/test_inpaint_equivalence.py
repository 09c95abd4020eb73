"""Inpainting: the engine's images equal diffusers' StableDiffusionInpaintPipeline's.

On an ordinary 4-channel UNet (latent blending) and on a 9-channel inpainting UNet
(``builtin:tiny-sd-inpaint``), alone and in batches mixed with text-to-image and img2img
requests (one with a LoRA); and the unmasked pixels stay exactly as they were.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.conditioning import ConditioningInput, encode_conditioning, latent_mask, overlay_unmasked
from deployments.engine.images import decode, to_uint8
from deployments.engine.step_scheduler import DenoiseRequest
from graph.image_decoding import load_image, original_pixels, preprocess_image, preprocess_mask

from engine_helpers import Engine
from lora_helpers import UNET_ATTN, make_peft_lora_file

SIZE = 64


def upload(array: np.ndarray) -> Image.Image:
    """An array through a PNG file and ``load_image``, as an upload would go."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return load_image(buf.getvalue(), max_bytes=1 << 20, max_pixels=1 << 20)


def init_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) + rng.integers(0, 24, (SIZE, SIZE, 3))
    return upload(np.clip(rgb, 0, 255).astype(np.uint8))


def mask_image(top: int = 16, left: int = 8, bottom: int = 48, right: int = 40) -> Image.Image:
    """White (repaint) rectangle on black (keep); its edges fall inside 8-pixel latent cells too."""
    m = np.zeros((SIZE, SIZE, 3), np.uint8)
    m[top:bottom, left:right] = 255
    return upload(m)


WHITE = np.full((SIZE, SIZE, 3), 255, np.uint8)


def conditioned_request(engine, prompt, negative="", *, image, mask, channels, scheduler, steps, strength, seed=0):
    """What the ingress + VAE stage hand the denoiser: one inpainting (or, mask None, img2img) image."""
    x = preprocess_image(image, SIZE, SIZE)
    m = preprocess_mask(mask, SIZE, SIZE) if mask is not None else None
    ((cond,),) = encode_conditioning(
        engine.vae,
        [ConditioningInput(x, [seed], strength, m)],
        unet_in_channels=channels,
        noise_dtype=torch.float32,
        per_image=True,
    )
    pos, neg = engine.prompts.encode_prompt([prompt, negative])
    return DenoiseRequest(pos, neg, SIZE, SIZE, steps, 7.5, seed, scheduler, conditioning=cond)


def run(engine, requests):
    """Submit together, tick to completion: (jobs, latents [n, 4, h, w], images [n, 3, H, W])."""
    jobs = engine.steps.submit(requests)
    while not engine.steps.idle:
        engine.steps.tick()
    latents = torch.cat([j.x_t for j in jobs])
    return jobs, latents, decode(engine.vae, latents, per_image=True)


def call_pipeline(pipe, **kwargs):
    """Run a diffusers pipeline: its final latents (before decode) and its images [n, 3, H, W]."""
    captured = {}

    def grab(pipe, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    pipe.set_progress_bar_config(disable=True)
    images = pipe(**kwargs, output_type="pt", callback_on_step_end=grab).images
    return captured["latents"], images


def inpaint_reference(engine, prompt, negative="", *, image, mask, scheduler, steps, strength, seed=0, pipe=None):
    from diffusers import StableDiffusionInpaintPipeline

    return call_pipeline(
        pipe or engine.pipeline(scheduler, StableDiffusionInpaintPipeline),
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    )


def img2img_reference(engine, prompt, negative="", *, image, scheduler, steps, strength, seed=0, pipe=None):
    from diffusers import StableDiffusionImg2ImgPipeline

    return call_pipeline(
        pipe or engine.pipeline(scheduler, StableDiffusionImg2ImgPipeline),
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def tiny_inpaint(cache_dir):
    """``builtin:tiny-sd-inpaint``: the tiny model with a 9-channel UNet, loaded like any checkpoint."""
    from deployments.engine import models

    directory = models.resolve_model_dir("builtin:tiny-sd-inpaint", cache_dir)
    cpu = torch.device("cpu")
    return {
        "info": models.read_model_info("builtin:tiny-sd-inpaint", directory),
        "tokenizer": models.load_tokenizer(directory),
        "text_encoder": models.load_text_encoder(directory, cpu, torch.float32),
        "unet": models.load_unet(directory, cpu, torch.float32),
        "vae": models.load_vae(directory, cpu, torch.float32),
    }


@pytest.fixture(scope="module")
def engine4(tiny):
    return Engine(tiny)


@pytest.fixture(scope="module")
def engine9(tiny_inpaint):
    return Engine(tiny_inpaint)


def test_builtin_inpaint_model_is_its_own(tiny, tiny_inpaint):
    assert tiny_inpaint["info"].unet_in_channels == 9 and tiny_inpaint["info"].latent_channels == 4
    assert tiny["info"].unet_in_channels == 4 and tiny["info"].latent_channels == 4
    assert tiny_inpaint["info"].directory != tiny["info"].directory


@pytest.mark.parametrize(
    "channels, scheduler, steps, strength, seed",
    [
        (4, "default", 6, 1.0, 1),  # strength 1: pure noise, then blending
        (4, "default", 6, 0.6, 2),
        (4, "ddim", 5, 0.6, 3),
        (4, "euler_a", 5, 1.0, 4),  # draws from the generator: the masked-image draw must be there
        (9, "default", 6, 1.0, 5),
        (9, "euler", 6, 0.6, 6),
        (9, "euler_a", 5, 1.0, 7),
    ],
)
def test_alone_equals_pipeline(engine4, engine9, channels, scheduler, steps, strength, seed):
    engine = engine4 if channels == 4 else engine9
    kw = dict(image=init_image(seed), mask=mask_image(), scheduler=scheduler, steps=steps, strength=strength, seed=seed)
    _, latents, images = run(engine, [conditioned_request(engine, "a red door", "blurry", channels=channels, **kw)])
    ref_latents, ref_images = inpaint_reference(engine, "a red door", "blurry", **kw)
    assert images.shape == ref_images.shape == (1, 3, SIZE, SIZE)
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    assert (images - ref_images).abs().max().item() <= 1e-4
    assert images.std().item() > 0.05


def test_img2img_on_an_inpainting_unet_is_inpainting_everything(engine9):
    """No mask on a 9-channel UNet: diffusers' inpainting pipeline with an all-white mask."""
    kw = dict(image=init_image(3), scheduler="ddim", steps=5, strength=0.6, seed=3)
    _, latents, _ = run(engine9, [conditioned_request(engine9, "a boat", mask=None, channels=9, **kw)])
    ref_latents, _ = inpaint_reference(engine9, "a boat", mask=upload(WHITE), **kw)
    assert (latents - ref_latents).abs().max().item() <= 1e-4


def test_unmasked_region_stays_as_it_was(engine4, capsys):
    image, mask = init_image(8), mask_image()
    request = conditioned_request(
        engine4, "a red door", image=image, mask=mask, channels=4, scheduler="ddim", steps=5, strength=0.8, seed=8
    )
    (job,), latents, images = run(engine4, [request])
    # Latents: blending leaves the kept cells exactly on the init image's latents after the last step.
    keep = request.conditioning.mask.expand_as(latents) == 0
    assert torch.equal(latents[keep], request.conditioning.image_latents[keep])
    assert not torch.equal(latents, request.conditioning.image_latents)  # the masked cells were repainted
    # Pixels: the VAE cannot reproduce them exactly; overlay_unmasked pastes the input back.
    m = preprocess_mask(mask, SIZE, SIZE)
    original, generated = original_pixels(image, SIZE, SIZE), to_uint8(images)[0]
    kept = m[0, 0].numpy() == 0
    drift = np.abs(generated.astype(int) - original.astype(int))[kept].max()
    out = overlay_unmasked(original, generated, m)
    assert np.array_equal(out[kept], original[kept])
    assert np.array_equal(out[~kept], generated[~kept])
    assert drift > 0  # without the overlay they do change (random-weight VAE: a lot)
    with capsys.disabled():
        print(f"\n[inpaint] unmasked pixels without overlay: max |diff| = {drift}/255 (tiny random-weight VAE)")


def test_text_to_image_on_an_inpainting_unet_gets_a_full_mask_and_no_image(engine9):
    (job,) = engine9.steps.submit([engine9.request("a cat", steps=2, seed=1)])
    assert job.unet_extra.shape == (2, 5, 8, 8)  # both guidance rows
    assert torch.equal(job.unet_extra[:, :1], torch.ones(2, 1, 8, 8))
    assert torch.equal(job.unet_extra[:, 1:], torch.zeros(2, 4, 8, 8))
    while not engine9.steps.idle:
        engine9.steps.tick()
    assert job.done and job.error is None and torch.isfinite(job.x_t).all()


def test_mixed_batch_on_an_inpainting_unet(engine9):
    kw = dict(scheduler="euler", steps=5, seed=2)
    requests = [
        conditioned_request(
            engine9, "a red door", image=init_image(2), mask=mask_image(), channels=9, strength=1.0, **kw
        ),
        engine9.request("a cat", steps=5, seed=4, scheduler="ddim"),
        conditioned_request(engine9, "a boat", image=init_image(5), mask=None, channels=9, strength=0.6, **kw),
    ]
    alone = [run(engine9, [r])[1] for r in requests]
    before = engine9.steps.ticks_run
    _, batched, _ = run(engine9, requests)
    assert engine9.steps.ticks_run - before == 5
    for i in range(3):
        assert torch.equal(batched[i : i + 1], alone[i]), i
    ref, _ = inpaint_reference(engine9, "a red door", image=init_image(2), mask=mask_image(), strength=1.0, **kw)
    assert (batched[:1] - ref).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def style_lora(tiny, tiny_dir, tmp_path_factory):
    """A UNet LoRA file (peft, non-zero init) and its canonical form."""
    from lora_registry.base_model import base_model_spec_from_dir
    from lora_registry.validation import prepare_adapter

    path = make_peft_lora_file(tiny, tmp_path_factory.mktemp("lora"), seed=1, rank=4, alpha=8, unet_targets=UNET_ATTN)
    return path, prepare_adapter(path.read_bytes(), base_model_spec_from_dir(tiny_dir)).adapter


def test_mixed_batch_text_img2img_with_lora_and_inpaint(tiny, style_lora):
    """One text-to-image, one img2img with a LoRA and two inpaintings share ticks; each equals its pipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from deployments.engine.multi_lora import MultiLoRAModel

    path, adapter = style_lora
    engine = Engine(tiny)
    engine.steps.lora = MultiLoRAModel(engine.unet, UNET_ATTN, num_slots=2, max_rank=8, deterministic=True)
    engine.steps.lora.load(1, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("unet").items()})

    img2img = conditioned_request(
        engine, "a castle", image=init_image(1), mask=None, channels=4, scheduler="ddim", steps=5, strength=0.8, seed=1
    )
    img2img.adapters = ((1, 0.8),)
    inpaint_kw = [
        dict(image=init_image(2), mask=mask_image(), scheduler="default", steps=5, strength=1.0, seed=2),
        dict(image=init_image(3), mask=mask_image(8, 24, 56, 56), scheduler="euler_a", steps=6, strength=0.7, seed=3),
    ]
    requests = [
        engine.request("a lighthouse", "fog", steps=5, seed=4, scheduler="euler"),
        img2img,
        *(conditioned_request(engine, "a red door", channels=4, **kw) for kw in inpaint_kw),
    ]
    jobs = engine.steps.submit(requests)
    engine.steps.tick()
    assert engine.steps.rows_run == 8  # all four in the first forward, guidance rows included
    while not engine.steps.idle:
        engine.steps.tick()
    batched = torch.cat([j.x_t for j in jobs])
    images = decode(engine.vae, batched, per_image=True)

    ref = engine.reference("a lighthouse", "fog", steps=5, seed=4, scheduler="euler")
    assert (images[:1] - ref).abs().max().item() <= 1e-4
    for i, kw in enumerate(inpaint_kw, start=2):
        ref_latents, ref_images = inpaint_reference(engine, "a red door", **kw)
        assert (batched[i : i + 1] - ref_latents).abs().max().item() <= 1e-4
        assert (images[i : i + 1] - ref_images).abs().max().item() <= 1e-4
    # diffusers alone with the LoRA: load_lora_weights + set_adapters, on a fresh copy of the UNet.
    ref_engine = Engine(tiny)
    pipe = ref_engine.pipeline("ddim", StableDiffusionImg2ImgPipeline)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    make_batch_invariant(pipe.unet)  # peft's lora layers get the batch-invariant kernels too
    ref_latents, ref_images = img2img_reference(
        ref_engine, "a castle", image=init_image(1), scheduler="ddim", steps=5, strength=0.8, seed=1, pipe=pipe
    )
    assert (batched[1:2] - ref_latents).abs().max().item() <= 1e-4
    assert (images[1:2] - ref_images).abs().max().item() <= 1e-4
    # ... and the LoRA really changes the picture.
    img2img.adapters = ()
    _, plain, _ = run(engine, [img2img])
    assert (plain - batched[1:2]).abs().max().item() > 0.05


def test_latent_mask_matches_the_pipelines(engine4):
    m = preprocess_mask(mask_image(), SIZE, SIZE)
    request = conditioned_request(
        engine4, "x", image=init_image(), mask=mask_image(), channels=4, scheduler="ddim", steps=2, strength=1.0
    )
    assert torch.equal(request.conditioning.mask, latent_mask(m, 8))
    assert request.conditioning.mask.shape == (1, 1, 8, 8)
    assert request.conditioning.mask.sum().item() == 4 * 4  # rows 2..5, columns 1..4 of the 8x8 latent grid
