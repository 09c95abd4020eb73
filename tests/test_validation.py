"""The one validation step (``Planner.check_inputs``) and the front ends' translations, in-process.

Tables: each bad canonical field -> status, code, canonical field path, a message naming the field and
the limit; then the same errors as the OpenAI and AUTOMATIC1111 routes answer them, in their own names.
The adapters come from a local registry (``served_adapters``: ink@1, ink@2, pastel@1, wide@1).
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from deployments.engine.config import LoRAConfig
from graph import a1111, errors, openai_images
from graph.adapters_api import AdapterResolver
from graph.config import LimitsConfig
from graph.errors import APIError, FieldError, field_path
from graph.image_decoding import load_image, original_pixels, preprocess_image, preprocess_mask
from graph.planning import Plan, Planner
from graph.schemas import GenerateRequest, LoRASpec, OpenAIImagesRequest
from graph.validation import NATIVE, FieldNames, GenerationInput

from image_helpers import png_b64

pytest_plugins = ["registry_helpers"]

LIMITS = LimitsConfig(max_image_pixels=4096)  # 64 x 64


def picture(width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask_pixels(width: int = 64, height: int = 64) -> np.ndarray:
    m = np.zeros((height, width), np.uint8)
    m[16:48, 8:40] = 255  # white = repaint
    return m


PIC, MASK = png_b64(picture()), png_b64(mask_pixels())
SMALL_MASK, BIG = png_b64(mask_pixels(64, 32)), png_b64(picture(100, 100))
NARROW = png_b64(picture(60, 64))


@pytest.fixture(scope="module")
def planner(tiny, served_adapters) -> Planner:
    resolver = AdapterResolver(served_adapters, served_adapters.base, LoRAConfig())
    return Planner(tiny["info"], "tiny-sd", LIMITS, tiny["tokenizer"], resolver)


def check(planner, request: GenerationInput, names: FieldNames = NATIVE) -> Plan:
    """What a route does: check, and answer errors in its own names."""
    try:
        return planner.check_inputs(request)
    except FieldError as e:
        raise names.translate(e) from e


# -- the canonical check ----------------------------------------------------------------------


def ink(version=None, scale=1.0) -> LoRASpec:
    return LoRASpec(name="ink", version=version, scale=scale)


CANONICAL = [
    # fields, status, code, canonical field, message (or a part of it)
    ({"model": "sdxl"}, 404, "model_not_found", "model", "unknown model 'sdxl'; served: 'tiny-sd'"),
    ({"prompt": "  "}, 422, "invalid_value", "prompt", "prompt must not be empty"),
    ({"width": 100}, 422, "invalid_value", "width", "width must be a multiple of 8 in [64, 1024], got 100"),
    ({"height": 2048}, 422, "invalid_value", "height", "height must be a multiple of 8 in [64, 1024], got 2048"),
    ({"width": 56}, 422, "invalid_value", "width", "width must be a multiple of 8 in [64, 1024], got 56"),
    ({"steps": 0}, 422, "invalid_value", "steps", "steps must be in [1, 150], got 0"),
    ({"steps": 151}, 422, "invalid_value", "steps", "steps must be in [1, 150], got 151"),
    ({"guidance_scale": 30.5}, 422, "invalid_value", "guidance_scale", "guidance_scale must be in [0, 30.0], got 30.5"),
    ({"guidance_scale": -1.0}, 422, "invalid_value", "guidance_scale", "guidance_scale must be in [0, 30.0], got -1.0"),
    ({"num_images": 0}, 422, "invalid_value", "num_images", "num_images must be in [1, 8], got 0"),
    ({"num_images": 9}, 422, "invalid_value", "num_images", "num_images must be in [1, 8], got 9"),
    ({"seed": -1}, 422, "invalid_value", "seed", "seed must be in [0, 4294967295], got -1"),
    (
        {"prompt": "cat " * 226},
        422,
        "prompt_too_long",
        "prompt",
        "prompt is 226 tokens; the limit is 225 tokens (3 chunks of 75: limits.max_prompt_chunks)",
    ),
    ({"negative_prompt": "dog " * 226}, 422, "prompt_too_long", "negative_prompt", "negative_prompt is 226 tokens"),
    ({"prompt": "(cat:1.2.3)"}, 422, "invalid_value", "prompt", "prompt: invalid attention weight '1.2.3'"),
    ({"negative_prompt": "(cat:1.2.3)"}, 422, "invalid_value", "negative_prompt", "negative_prompt: invalid attention"),
    ({"prompt": "a <lora:ink:abc>"}, 422, "invalid_value", "prompt", "prompt: <lora:ink:abc>: the weight must be a"),
    (
        {"prompt": "a <lora:ink:5>"},
        422,
        "invalid_value",
        "prompt",
        "prompt: <lora:ink:5>: the weight must be in [0, 4.0] (lora.max_scale)",
    ),
    ({"prompt": "a <lora:nosuch>"}, 404, "adapter_not_found", "prompt", "unknown adapter 'nosuch'"),
    ({"loras": (LoRASpec(name="nosuch"),)}, 404, "adapter_not_found", "loras[0]", "unknown adapter 'nosuch'"),
    ({"loras": (ink(1), ink(2, 4.5))}, 422, "invalid_value", "loras[1].scale", "loras[1].scale must be in [0, 4.0]"),
    ({"loras": (ink(), ink(2))}, 422, "invalid_value", "loras[1]", "loras[1]: adapter ink@2 is listed twice"),
    (
        {"prompt": "a <lora:ink>", "loras": (ink(),)},
        422,
        "invalid_value",
        "prompt",
        "prompt: adapter ink@2 is both in loras and a <lora:...> tag",
    ),
    (
        {"prompt": "<lora:wide> <lora:pastel> <lora:ink@1>", "loras": (ink(2), LoRASpec(name="pastel", version=1))},
        422,
        "invalid_value",
        "prompt",
        "prompt: at most 4 adapters per request (loras and <lora:...> tags together), got 5",
    ),
    # image-conditioned requests
    ({"image": "%%%"}, 422, "invalid_image", "image", "image is not valid base64"),
    ({"image": BIG}, 422, "invalid_image", "image", "image is 100x100 = 10000 pixels; the limit is 4096 pixels"),
    (
        {"image": NARROW},
        422,
        "invalid_image",
        "image",
        "image is 60x64: its width rounded down to a multiple of 8 is 56, outside [64, 1024]; "
        "give width and height to resize it",
    ),
    ({"image": PIC, "mask": SMALL_MASK}, 422, "invalid_image", "mask", "mask size 64x32 does not match image size"),
    ({"image": PIC, "mask": "data:image/gif;base64,R0lGOD"}, 422, "invalid_image", "mask", "mask: data URL type"),
    ({"image": PIC, "strength": 0.0}, 422, "invalid_value", "strength", "strength must be in the interval (0, 1]"),
    (
        {"image": PIC, "strength": 0.1, "steps": 5},
        422,
        "invalid_value",
        "strength",
        "strength 0.1 with 5 steps runs no step; need strength >= 1/steps = 0.2",
    ),
    ({"image": PIC, "width": 60}, 422, "invalid_value", "width", "width must be a multiple of 8 in [64, 1024], got 60"),
    ({"mask": MASK}, 422, "invalid_value", "mask", "mask needs an image (img2img / inpainting)"),
    ({"strength": 0.5}, 422, "invalid_value", "strength", "strength needs an image (img2img / inpainting)"),
]


@pytest.mark.parametrize("fields, status, code, field, message", CANONICAL)
def test_check_inputs_names_the_canonical_field_and_the_limit(planner, fields, status, code, field, message):
    with pytest.raises(FieldError) as e:
        planner.check_inputs(GenerationInput(**{"prompt": "a boat", "steps": 4, "seed": 1, **fields}))
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field)
    assert message in e.value.message
    native = NATIVE.translate(e.value)  # the native names are the canonical ones
    assert (native.status, native.code, native.field, native.message) == (status, code, field, e.value.message)


def test_up_to_the_adapter_limit_loras_and_tags_compose_in_order(planner):
    request = GenerationInput("<lora:wide> <lora:pastel:0.5>", loras=(ink(1), ink(2, 0.25)), seed=1)
    plan = planner.check_inputs(request)
    assert plan.applied == (("ink@1", 1.0), ("ink@2", 0.25), ("wide@1", 1.0), ("pastel@1", 0.5))
    assert plan.text_adapters == (("pastel@1", 0.5),) and plan.prompt == " "


def test_a_valid_request_becomes_its_plan(planner):
    request = GenerationInput(
        "a (boat:1.2) <lora:pastel:0.5>",
        "fog",
        model="tiny-sd",
        steps=7,
        guidance_scale=0,
        num_images=3,
        scheduler="ddim",
        output_format="webp",
        loras=(ink(1, 0.0),),
        tenant="user:a",
    )
    plan = planner.check_inputs(request)
    assert (plan.prompt, plan.negative_prompt, plan.width, plan.height) == ("a (boat:1.2) ", "fog", 256, 256)
    assert (plan.steps, plan.guidance_scale, plan.num_images, plan.scheduler) == (7, 0.0, 3, "ddim")
    assert (plan.output_format, plan.tenant, plan.mode) == ("webp", "user:a", "txt2img")
    assert plan.applied == (("ink@1", 0.0), ("pastel@1", 0.5)) and plan.text_adapters == (("pastel@1", 0.5),)
    assert 0 <= plan.seed < 2**31 and plan.conditioning is None and plan.overlay is None


def pixels_of(b64: str, invert: bool = False):
    return load_image(base64.b64decode(b64), max_bytes=1 << 20, max_pixels=1 << 20, invert=invert)


@pytest.mark.parametrize("size", [None, (128, 96)])
def test_an_image_request_carries_the_tensors_of_diffusers_preprocessing(planner, size):
    width, height = size or (None, None)
    plan = planner.check_inputs(GenerationInput("x", image=PIC, seed=5, num_images=2, width=width, height=height))
    w, h = size or (64, 64)
    assert (plan.mode, plan.width, plan.height, plan.overlay) == ("img2img", w, h, None)
    c = plan.conditioning
    assert (c.seeds, c.strength, c.mask) == ([5, 6], 0.75, None)
    assert torch.equal(c.image, preprocess_image(pixels_of(PIC), w, h))


def test_an_inpainting_request_carries_its_mask_and_the_pixels_to_paste_back(planner):
    plan = planner.check_inputs(GenerationInput("x", image=PIC, mask=MASK, seed=5))
    c = plan.conditioning
    assert (plan.mode, c.seeds, c.strength) == ("inpaint", [5], 1.0)
    assert torch.equal(c.mask, preprocess_mask(pixels_of(MASK), 64, 64))
    assert np.array_equal(plan.overlay.original, original_pixels(pixels_of(PIC), 64, 64))
    assert np.array_equal(plan.overlay.mask, (mask_pixels() == 255).astype(np.uint8))
    kept = planner.check_inputs(GenerationInput("x", image=PIC, mask=MASK, seed=5, preserve_unmasked=False))
    assert kept.overlay is None and torch.equal(kept.conditioning.mask, c.mask)


# -- OpenAI ------------------------------------------------------------------------------------


OPENAI = [
    # body, status, code, the OpenAI field, message (or a part of it)
    ({"n": 9}, 422, "invalid_value", "n", "n must be in [1, 8], got 9"),
    ({"size": "64x60"}, 422, "invalid_value", "size", "size: height must be a multiple of 8 in [64, 1024], got 60"),
    ({"size": "2048x64"}, 422, "invalid_value", "size", "size: width must be a multiple of 8 in [64, 1024], got 2048"),
    ({"size": "big"}, 422, "invalid_value", "size", "size must look like \"512x512\", got 'big'"),
    ({"model": "sdxl"}, 404, "model_not_found", "model", "unknown model 'sdxl'; served: 'tiny-sd'"),
    ({"model": "sdxl:ink"}, 404, "model_not_found", "model", "unknown model 'sdxl'"),
    ({"model": "tiny-sd:nosuch"}, 404, "adapter_not_found", "model", "unknown adapter 'nosuch'"),
    ({"model": "tiny-sd:ink@9"}, 404, "adapter_not_found", "model", "unknown adapter 'ink@9'"),
    ({"model": "tiny-sd:ink@x"}, 422, "invalid_value", "model", 'model must look like "base:adapter[@version]"'),
    ({"model": "tiny-sd:ink@0"}, 422, "invalid_value", "model", 'model must look like "base:adapter[@version]"'),
    # the model's adapter is the first; the body's own loras keep their indices
    ({"model": "tiny-sd:ink", "loras": [{"name": "nosuch"}]}, 404, "adapter_not_found", "loras[0]", "'nosuch'"),
    (
        {"model": "tiny-sd:ink", "loras": [{"name": "pastel", "scale": 4.5}]},
        422,
        "invalid_value",
        "loras[0].scale",
        "loras[0].scale must be in [0, 4.0], got 4.5",
    ),
    (
        {"model": "tiny-sd:ink@2", "loras": [{"name": "ink"}]},
        422,
        "invalid_value",
        "loras[0]",
        "loras[0]: adapter ink@2 is listed twice",
    ),
    ({"loras": [{"name": "pastel", "scale": 4.5}]}, 422, "invalid_value", "loras[0].scale", "loras[0].scale must"),
    ({"steps": 151}, 422, "invalid_value", "steps", "steps must be in [1, 150], got 151"),
    ({"guidance_scale": 31.0}, 422, "invalid_value", "guidance_scale", "guidance_scale must be in [0, 30.0]"),
    ({"prompt": "cat " * 226}, 422, "prompt_too_long", "prompt", "prompt is 226 tokens"),
    ({"prompt": "a <lora:ink:9>"}, 422, "invalid_value", "prompt", "prompt: <lora:ink:9>: the weight must be"),
    ({"background": "transparent"}, 422, "unsupported_value", "background", 'use "opaque" or "auto"'),
]


@pytest.mark.parametrize("body, status, code, field, message", OPENAI)
def test_openai_errors_name_the_openai_field(planner, body, status, code, field, message):
    req = OpenAIImagesRequest.model_validate_json(json.dumps({"prompt": "a boat", "steps": 4, **body}))
    with pytest.raises(APIError) as e:
        check(planner, *openai_images.to_input(req, "anonymous"))
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field)
    assert message in e.value.message


def test_openai_names_in():
    body = {"prompt": "p", "n": 2, "size": "64x128", "model": "tiny-sd:ink@1", "loras": [{"name": "pastel"}]}
    request, _ = openai_images.to_input(OpenAIImagesRequest.model_validate(body), "user:a")
    assert (request.num_images, request.width, request.height, request.model) == (2, 64, 128, "tiny-sd")
    assert request.loras == (ink(1), LoRASpec(name="pastel")) and request.tenant == "user:a"
    request, names = openai_images.to_input(OpenAIImagesRequest(prompt="p"), "anonymous")
    assert (request.model, request.width, request.height, request.loras) == (None, None, None, ())
    assert names.outward("loras[0].scale") == "loras[0].scale"


# -- AUTOMATIC1111 -----------------------------------------------------------------------------


A1111 = [
    # body, status, code, the A1111 field, message (or a part of it)
    ({"cfg_scale": 31.0}, 422, "invalid_value", "cfg_scale", "cfg_scale must be in [0, 30.0], got 31.0"),
    (
        {"batch_size": 9},
        422,
        "invalid_value",
        "batch_size",
        "batch_size × n_iter must be at most 8 images, got 9 × 1 = 9",
    ),
    ({"batch_size": 4, "n_iter": 3}, 422, "invalid_value", "n_iter", "at most 8 images, got 4 × 3 = 12"),
    ({"batch_size": 9, "n_iter": 2}, 422, "invalid_value", "batch_size", "got 9 × 2 = 18"),
    ({"steps": 999}, 422, "invalid_value", "steps", "steps must be in [1, 150], got 999"),
    ({"width": 65}, 422, "invalid_value", "width", "width must be a multiple of 8 in [64, 1024], got 65"),
    ({"prompt": ""}, 422, "invalid_value", "prompt", "prompt must not be empty"),
    ({"prompt": "a <lora:nosuch:0.5>"}, 404, "adapter_not_found", "prompt", "unknown adapter 'nosuch'"),
    ({"init_images": ["%%%"]}, 422, "invalid_image", "init_images", "init_images is not valid base64"),
    ({"init_images": [BIG]}, 422, "invalid_image", "init_images", "init_images is 100x100 = 10000 pixels; the limit"),
    (
        {"init_images": [NARROW]},
        422,
        "invalid_image",
        "init_images",
        "init_images is 60x64: its width rounded down to a multiple of 8 is 56",
    ),
    (
        {"init_images": [PIC], "mask": SMALL_MASK},
        422,
        "invalid_image",
        "mask",
        "mask size 64x32 does not match init_images size 64x64",
    ),
    ({"init_images": [PIC], "mask": BIG, "inpainting_mask_invert": 1}, 422, "invalid_image", "mask", "mask is 100x100"),
    ({"init_images": [PIC], "mask": "not base64!", "inpainting_mask_invert": 1}, 422, "invalid_image", "mask", "mask"),
    (
        {"init_images": [PIC], "denoising_strength": 0.1, "steps": 5},
        422,
        "invalid_value",
        "denoising_strength",
        "denoising_strength 0.1 with 5 steps runs no step; need denoising_strength >= 1/steps = 0.2",
    ),
    ({"init_images": [PIC], "width": 60}, 422, "invalid_value", "width", "width must be a multiple of 8"),
    ({"init_images": [PIC], "cfg_scale": 40.0}, 422, "invalid_value", "cfg_scale", "cfg_scale must be in [0, 30.0]"),
    (
        {"init_images": [PIC], "sampler_name": "DPM fast"},
        422,
        "invalid_value",
        "sampler_name",
        "unknown sampler 'DPM fast'",
    ),
    (
        {"sampler_name": "Euler a", "scheduler": "Karras"},
        422,
        "invalid_value",
        "scheduler",
        "takes no 'Karras' schedule",
    ),
]


def a1111_call(body: dict):
    body = json.dumps({"prompt": "a boat", "steps": 4, "width": 64, "height": 64, **body})
    samplers = a1111.sampler_table("PNDMScheduler")
    if "init_images" in body:
        return a1111.img2img_call(a1111.Img2ImgRequest.model_validate_json(body), LimitsConfig(), samplers)
    return a1111.txt2img_call(a1111.Txt2ImgRequest.model_validate_json(body), LimitsConfig(), samplers)


@pytest.mark.parametrize("body, status, code, field, message", A1111)
def test_a1111_errors_name_the_a1111_field(planner, body, status, code, field, message):
    if "init_images" in body:  # the image decides the size
        body = {"width": None, "height": None, **body}
    with pytest.raises(APIError) as e:
        call = a1111_call(body)
        check(planner, call.request, call.names)
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field)
    assert message in e.value.message


def test_a1111_inverted_mask_is_the_native_inpainting_of_the_inverted_mask(planner):
    inverted = png_b64(255 - mask_pixels())
    call = a1111_call(
        {"init_images": [PIC], "mask": MASK, "inpainting_mask_invert": 1, "seed": 3, "denoising_strength": 0.6}
    )
    ours = check(planner, call.request, call.names)
    native = planner.check_inputs(
        GenerationInput("a boat", steps=4, width=64, height=64, seed=3, image=PIC, mask=inverted, strength=0.6)
    )
    assert torch.equal(ours.conditioning.mask, native.conditioning.mask)
    assert torch.equal(ours.conditioning.image, native.conditioning.image)
    assert np.array_equal(ours.overlay.mask, native.overlay.mask)
    assert np.array_equal(ours.overlay.original, native.overlay.original)
    assert ours.conditioning.mask.sum() == 64 * 64 - 32 * 32  # the white part became the kept one


# -- the field paths' one spelling ---------------------------------------------------------


@pytest.mark.parametrize(
    "loc, path",
    [
        (("loras", 0, "scale"), "loras[0].scale"),
        (("loras", 12), "loras[12]"),
        (("init_images", 0), "init_images[0]"),
        (("prompt",), "prompt"),
        (("a", "b", 1, 2, "c"), "a.b[1][2].c"),
        ((), None),
    ],
)
def test_field_path(loc, path):
    assert field_path(loc) == path


@pytest.mark.parametrize(
    "body, status, code, field, message",
    [
        ({"prompt": "x", "loras": [{"name": "a", "scale": -1}]}, 422, "invalid_value", "loras[0].scale", "loras[0]."),
        ({"prompt": "x", "loras": [{"name": "a"}, {"nme": "b"}]}, 422, "missing_field", "loras[1].name", None),
        ({"prompt": "x", "width": "64"}, 422, "invalid_value", "width", "width: Input should be a valid integer"),
        ({"prompt": "x", "colour": "red"}, 422, "unknown_field", "colour", "unknown field colour"),
        ({}, 422, "missing_field", "prompt", "prompt is required"),
    ],
)
def test_pydantic_errors_use_the_same_spelling(body, status, code, field, message):
    with pytest.raises(ValidationError) as e:
        GenerateRequest.model_validate_json(json.dumps(body))
    app = FastAPI()
    errors.install(app)
    handler = app.exception_handlers[RequestValidationError]
    exc = RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()])
    from starlette.requests import Request

    request = Request({"type": "http", "method": "POST", "path": "/v1/generate", "root_path": "", "headers": []})
    error = json.loads(asyncio.run(handler(request, exc)).body)["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"].startswith(message or f"{field} is required")
