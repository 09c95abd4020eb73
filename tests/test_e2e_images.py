"""img2img and inpainting end to end: real HTTP, the VAE deployment's encode, the Denoiser's batches.

The served image equals diffusers' pipelines on the same weights and seed; bad uploads are a clear
422 and reach no model; unmasked pixels come back exactly.
"""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from test_e2e_http import run_alone

from conftest import HeldDenoiser
from image_helpers import png_b64

pytestmark = pytest.mark.e2e

SIZE = 64


def picture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) + rng.integers(0, 24, (SIZE, SIZE, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def mask_pixels() -> np.ndarray:
    m = np.zeros((SIZE, SIZE, 3), np.uint8)
    m[16:48, 8:40] = 255  # white = repaint
    return m


def post(cluster, path, body):
    return requests.post(cluster.url + path, json=body, timeout=300)


def image_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0]["b64"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_pil(pixels: np.ndarray) -> Image.Image:
    from graph.image_decoding import load_image

    return load_image(base64.b64decode(png_b64(pixels)), max_bytes=1 << 20, max_pixels=1 << 20)


def pipeline(cls, tiny, scheduler: str):
    """A diffusers pipeline of class ``cls`` on the served model's own modules."""
    from deployments.engine.schedulers import SchedulerFactory

    info = tiny["info"]
    pipe = cls(
        vae=tiny["vae"],
        text_encoder=tiny["text_encoder"],
        tokenizer=tiny["tokenizer"],
        unet=tiny["unet"],
        scheduler=SchedulerFactory(info.scheduler_class, info.scheduler_config).create(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


IMG2IMG = {"prompt": "a watercolor harbour", "negative_prompt": "blurry", "steps": 6, "seed": 5, "strength": 0.7}
INPAINT = {"prompt": "a red door", "steps": 5, "seed": 8, "strength": 0.8, "scheduler": "ddim"}


def test_img2img_equals_diffusers_img2img_pipeline(cluster, tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    from deployments.engine.images import to_uint8

    served = image_of(post(cluster, "/v1/img2img", {**IMG2IMG, "image": png_b64(picture())}))
    pipe = pipeline(StableDiffusionImg2ImgPipeline, tiny, "default")
    import torch

    ref = pipe(
        prompt=IMG2IMG["prompt"],
        negative_prompt=IMG2IMG["negative_prompt"],
        image=to_pil(picture()),
        strength=0.7,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    assert np.abs(served.astype(int) - to_uint8(ref)[0]).max() <= 1
    # The init image matters: another picture gives another result.
    other = image_of(post(cluster, "/v1/img2img", {**IMG2IMG, "image": png_b64(picture(1))}))
    assert np.abs(other.astype(int) - served).max() > 10


def test_inpaint_keeps_unmasked_pixels_and_equals_the_pipeline_inside(cluster, tiny):
    from diffusers import StableDiffusionInpaintPipeline

    from deployments.engine.images import to_uint8

    body = {**INPAINT, "image": png_b64(picture(3)), "mask": png_b64(mask_pixels())}
    served = image_of(post(cluster, "/v1/inpaint", body))
    keep = mask_pixels()[..., 0] == 0
    assert np.array_equal(served[keep], picture(3)[keep])  # unmasked pixels exactly as sent
    raw = image_of(post(cluster, "/v1/inpaint", {**body, "preserve_unmasked": False}))
    pipe = pipeline(StableDiffusionInpaintPipeline, tiny, "ddim")
    import torch

    ref = pipe(
        prompt="a red door",
        image=to_pil(picture(3)),
        mask_image=to_pil(mask_pixels()),
        height=SIZE,
        width=SIZE,
        strength=0.8,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(8),
        output_type="pt",
    ).images
    assert np.abs(raw.astype(int) - to_uint8(ref)[0]).max() <= 1
    assert np.array_equal(served[~keep], raw[~keep])  # the repainted part is the pipeline's


def test_mixed_concurrent_requests_equal_their_alone_images(cluster):
    t2i = {"prompt": "a lighthouse", "width": SIZE, "height": SIZE, "steps": 6, "seed": 2}
    i2i = {**IMG2IMG, "image": png_b64(picture())}
    inp = {**INPAINT, "image": png_b64(picture(3)), "mask": png_b64(mask_pixels())}
    calls = [("/v1/generate", t2i), ("/v1/img2img", i2i), ("/v1/inpaint", inp)]
    alone = [run_alone(cluster, lambda c=c: post(cluster, *c)) for c in calls]
    # All six wait behind a held batch, then go together: concurrent by construction, at any speed.
    with ThreadPoolExecutor(6) as pool, HeldDenoiser(cluster) as held:
        futures = [pool.submit(post, cluster, *c) for c in calls * 2]
        held.wait_waiting(6)
        held.release()
        together = [image_of(f.result()) for f in futures]
    after = cluster.stats("Denoiser")
    for k, image in enumerate(together):
        assert np.array_equal(image, alone[k % 3][0])
    # They shared ticks: fewer forwards than the same requests one at a time.
    rows = 2 * sum(rows for _, _, rows in alone)
    assert held.ticks_besides(after, rows_besides=rows) < 2 * sum(ticks for _, ticks, _ in alone)


def test_jobs_and_a1111_take_images(cluster):
    body = {**IMG2IMG, "image": png_b64(picture())}
    direct = image_of(post(cluster, "/v1/img2img", body))
    r = post(cluster, "/v1/jobs", body)
    assert r.status_code == 202, r.text
    job_url = cluster.url + r.json()["url"]
    import time

    deadline = time.monotonic() + 120
    while (job := requests.get(job_url, timeout=30).json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job["status"] == "done", job
    data = base64.b64decode(job["images"][0]["b64"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), direct)
    a1111 = {
        "prompt": IMG2IMG["prompt"],
        "negative_prompt": IMG2IMG["negative_prompt"],
        "init_images": [body["image"]],
        "denoising_strength": 0.7,
        "steps": 6,
        "seed": 5,
        "cfg_scale": 7.5,
        "sampler_name": "PLMS",
    }
    r = post(cluster, "/sdapi/v1/img2img", a1111)
    assert r.status_code == 200, r.text
    a1111_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(a1111_pixels, direct)


def _bomb() -> str:
    """A tiny PNG whose header declares 20000 x 20000 pixels."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD = [
    ("/v1/img2img", {"image": base64.b64encode(b"not an image at all").decode()}, "image"),
    ("/v1/img2img", {"image": "%%% not base64"}, "image"),
    ("/v1/img2img", {"image": "BOMB"}, "image"),
    ("/v1/img2img", {"image": "PIC", "strength": 0.0}, "strength"),
    ("/v1/img2img", {"image": "PIC", "strength": 1.5}, "strength"),
    ("/v1/inpaint", {"image": "PIC", "mask": "SMALLMASK"}, "mask"),
    ("/v1/img2img", {"image": "PIC", "width": 60}, "width"),
    ("/v1/jobs", {"mask": "PIC"}, "mask"),
    ("/sdapi/v1/img2img", {"init_images": ["BOMB"]}, "init_images"),
]


@pytest.mark.parametrize("path, fields, field", BAD)
def test_bad_image_input_is_a_clear_422_and_reaches_no_model(cluster, path, fields, field):
    subs = {"PIC": png_b64(picture()), "BOMB": _bomb(), "SMALLMASK": png_b64(mask_pixels()[:32])}
    body = {"prompt": "x", "steps": 4, **{k: subs.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}}
    if "init_images" in body:
        body["init_images"] = [subs.get(v, v) for v in body["init_images"]]
    before_vae, before_denoiser = cluster.stats("VAE"), cluster.stats("Denoiser")
    r = post(cluster, path, body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"]
    assert cluster.stats("VAE")["encoded_images"] == before_vae["encoded_images"]
    assert cluster.stats("Denoiser")["ticks"] == before_denoiser["ticks"]


def test_upload_byte_cap_is_stated(cluster):
    huge = base64.b64encode(b"\0" * 10_000_001).decode()
    r = post(cluster, "/v1/img2img", {"prompt": "x", "image": huge})
    assert r.status_code == 422
    assert "10000000 bytes" in r.json()["error"]["message"]
