"""SDXL img2img and inpainting: the engine equals StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline (4- and 9-channel UNets), alone and in one mixed batch."""

from __future__ import annotations

import pytest
import torch
from test_inpaint_equivalence import SIZE, init_image, mask_image

from deployments.engine.conditioning import ConditioningInput, encode_conditioning
from graph.image_decoding import preprocess_image, preprocess_mask

from engine_helpers import SDXLEngine


@pytest.fixture(scope="module")
def engine(tiny_sdxl):
    return SDXLEngine(tiny_sdxl)


@pytest.fixture(scope="module")
def engine9(cache_dir):
    """``builtin:tiny-sdxl-inpaint``: SDXL's layout with a 9-channel UNet."""
    from deployments.engine import models

    d = models.resolve_model_dir("builtin:tiny-sdxl-inpaint", cache_dir)
    cpu = torch.device("cpu")
    parts = {
        "info": models.read_model_info("builtin:tiny-sdxl-inpaint", d),
        "tokenizer": models.load_tokenizer(d),
        "tokenizer_2": models.load_tokenizer(d, "tokenizer_2"),
        "text_encoder": models.load_text_encoder(d, cpu, torch.float32),
        "text_encoder_2": models.load_text_encoder(d, cpu, torch.float32, "text_encoder_2"),
        "unet": models.load_unet(d, cpu, torch.float32),
        "vae": models.load_vae(d, cpu, torch.float32),
    }
    assert parts["info"].family == "sdxl-inpaint"
    return SDXLEngine(parts)


def conditioned(engine, prompt, negative="", *, mask, scheduler, steps, strength, seed):
    x = preprocess_image(init_image(seed), SIZE, SIZE)
    m = preprocess_mask(mask, SIZE, SIZE) if mask is not None else None
    ((cond,),) = encode_conditioning(
        engine.vae,
        [ConditioningInput(x, [seed], strength, m)],
        unet_in_channels=engine.info.unet_in_channels,
        noise_dtype=torch.float32,
        per_image=True,
    )
    return engine.request(prompt, negative, steps=steps, seed=seed, scheduler=scheduler, conditioning=cond)


def reference(engine, prompt, negative="", *, mask, scheduler, steps, strength, seed):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    kwargs = {
        "prompt": prompt,
        "negative_prompt": negative or None,
        "image": init_image(seed),
        "strength": strength,
        "num_inference_steps": steps,
        "guidance_scale": 6.0,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "latent",
    }
    if mask is None and engine.info.unet_in_channels == 4:
        pipe = engine.pipeline(scheduler, StableDiffusionXLImg2ImgPipeline)
    else:  # inpainting; an inpainting UNet's img2img is inpainting everything (an all-white mask)
        pipe = engine.pipeline(scheduler, StableDiffusionXLInpaintPipeline)
        kwargs |= {"mask_image": mask if mask is not None else WHITE, "height": SIZE, "width": SIZE}
    return pipe(**kwargs).images


def _white():
    import numpy as np
    from test_inpaint_equivalence import upload

    return upload(np.full((SIZE, SIZE, 3), 255, np.uint8))


WHITE = _white()

CASES = [
    # kind, negative, scheduler, steps, strength, seed
    ("img2img", "blurry", "default", 6, 0.6, 1),
    ("img2img", "", "euler_a", 5, 0.8, 2),
    ("inpaint", "", "default", 5, 1.0, 3),
    ("inpaint", "ugly", "ddim", 6, 0.7, 4),
]


@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("kind, negative, scheduler, steps, strength, seed", CASES)
def test_alone_equals_pipeline(engine, engine9, channels, kind, negative, scheduler, steps, strength, seed):
    e = engine if channels == 4 else engine9
    mask = mask_image() if kind == "inpaint" else None
    args = {"mask": mask, "scheduler": scheduler, "steps": steps, "strength": strength, "seed": seed}
    ours = e.run_latents([conditioned(e, "a watercolor cat", negative, **args)])
    ref = reference(e, "a watercolor cat", negative, **args)
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_mixed_batch_text_img2img_and_inpaint(engine):
    requests = [
        engine.request("a cat", steps=5, seed=9),
        conditioned(engine, "a house", mask=None, scheduler="default", steps=6, strength=0.5, seed=10),
        conditioned(engine, "a tree", "dark", mask=mask_image(), scheduler="default", steps=5, strength=0.9, seed=11),
    ]
    alone = torch.cat([engine.run_latents([r]) for r in requests])
    batched = engine.run_latents(requests)
    assert torch.equal(batched, alone) or (batched - alone).abs().max().item() <= 1e-5
    ref = reference(engine, "a tree", "dark", mask=mask_image(), scheduler="default", steps=5, strength=0.9, seed=11)
    assert (batched[2:] - ref).abs().max().item() <= 1e-4
