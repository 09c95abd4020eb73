"""IP-Adapter end to end (issue 22): ``style_image`` over real HTTP and Ray Serve, through the ImageEncoder
deployment, in the Denoiser's mixed batches.

A second application on the session's Ray instance (``/style``): ``builtin:tiny-sd`` served with its builtin
IP-Adapter (``model.ip_adapter``), one replica per stage. Each served image equals diffusers'
``StableDiffusionPipeline`` + ``load_ip_adapter`` + ``set_ip_adapter_scale`` on the same weights, seed and
reference image (the pipeline's ``feature_extractor`` + ``image_encoder``), within the e2e image tests'
tolerance (1 in uint8), also when sent together with another style image, per-block scales, a LoRA row and a
plain row; a job takes a style image too; the ImageEncoder's cache answers a repeated image.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from style_app import STYLE_APP, deployed
from test_ip_adapter import InvariantIPAdapter, image_encoder, ip_dir, reference_pipe  # noqa: F401 - fixtures

from conftest import ADMIN_TOKEN, Cluster, HeldDenoiser, wait_until
from image_helpers import png_b64
from lora_helpers import UNET_ATTN, make_peft_lora_file

pytestmark = pytest.mark.e2e

SIZE, STEPS = 64, 3
BASE = {"width": SIZE, "height": SIZE, "steps": STEPS, "scheduler": "ddim"}


def picture(seed: int, width: int = 48, height: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def style_app(cluster, cache_dir, tmp_path_factory):
    """The style app (see the module docstring); its Denoiser holds 8 rows, as the session app's (HeldDenoiser)."""
    with deployed(
        cluster,
        cache_dir,
        tmp_path_factory,
        denoiser={"max_queued_images": 8},
        image_encoder={"cache_size": 16},
        admin={"token": ADMIN_TOKEN},
    ) as url:
        yield Cluster(url, STYLE_APP, cluster.s3)


@pytest.fixture(scope="module")
def style_lora(style_app, tiny, tmp_path_factory):
    """A PEFT LoRA registered on the style app as ``ink``: (name, file)."""
    path = make_peft_lora_file(
        tiny, tmp_path_factory.mktemp("style-lora"), seed=3, rank=4, alpha=8, unet_targets=UNET_ATTN
    )
    with open(path, "rb") as f:
        r = requests.post(
            style_app.url + "/v1/adapters",
            files={"file": (path.name, f)},
            data={"name": "ink"},
            headers=style_app.admin,
            timeout=120,
        )
    assert r.status_code in (200, 201), r.text
    return "ink", path


def post(app, path: str, body: dict) -> requests.Response:
    return requests.post(app.url + path, json=body, timeout=300)


def image_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["b64"]))).convert("RGB"))


def reference(tiny, ip_dir, image_encoder, prompt, seed, style=None, scale=1.0, lora=None) -> np.ndarray:  # noqa: F811
    """diffusers alone for one request: the pipeline's own feature_extractor, image_encoder and IP processors."""
    from transformers import CLIPImageProcessor

    from deployments.engine.images import to_uint8
    from graph.image_decoding import load_image

    pipe = reference_pipe(tiny, ip_dir, image_encoder, image=style, scale=scale, lora=lora)
    side = image_encoder.config.image_size
    pipe.register_modules(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    )
    kwargs = {}
    if style is not None:  # the upload as the server decodes it
        kwargs["ip_adapter_image"] = load_image(base64.b64decode(png_b64(style)), max_bytes=1 << 20, max_pixels=1 << 20)
    with InvariantIPAdapter(pipe):
        out = pipe(
            prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            **kwargs,
        ).images
    return to_uint8(out)[0]


def test_models_list_style_image_and_a_style_request_equals_diffusers(style_app, tiny, ip_dir, image_encoder):  # noqa: F811
    (entry,) = requests.get(style_app.url + "/v1/models", timeout=30).json()["data"]
    assert entry["style_image"] is True
    assert requests.get(style_app.url + "/readyz", timeout=30).json()["deployments"]["ImageEncoder"] == "ready"
    body = {**BASE, "prompt": "a lighthouse", "seed": 4, "style_image": png_b64(picture(1)), "style_scale": 0.8}
    served = image_of(post(style_app, "/v1/generate", body))
    ref = reference(tiny, ip_dir, image_encoder, "a lighthouse", 4, style=picture(1), scale=0.8)
    assert np.abs(served.astype(int) - ref).max() <= 1
    plain = image_of(post(style_app, "/v1/generate", {**BASE, "prompt": "a lighthouse", "seed": 4}))
    assert np.abs(plain.astype(int) - served).max() > 10  # the style image matters
    # The same image again (as a data URL this time): the ImageEncoder's cache answers, the image is the same.
    before = style_app.stats("ImageEncoder")
    again = image_of(post(style_app, "/v1/generate", {**body, "style_image": png_b64(picture(1), data_url=True)}))
    after = style_app.stats("ImageEncoder")
    assert np.array_equal(again, served)
    assert (after["cache_hits"] - before["cache_hits"], after["encoded"] - before["encoded"]) == (1, 0)


def test_a_mixed_batch_equals_each_request_alone_in_diffusers(style_app, style_lora, tiny, ip_dir, image_encoder):  # noqa: F811
    name, lora_path = style_lora
    up = {"up": {"block_1": [0.0, 1.0]}}  # per-block: one attention layer of one up block (InstantStyle's kind)
    cases = [
        # body extras, reference kwargs
        (
            {"prompt": "a cat", "seed": 1, "style_image": png_b64(picture(1)), "style_scale": 0.6},
            {"style": picture(1), "scale": 0.6},
        ),
        (
            {
                "prompt": "a red fox",
                "seed": 2,
                "style_image": png_b64(picture(2)),
                "style_scale": up,
                "loras": [{"name": name, "scale": 0.8}],
            },
            {"style": picture(2), "scale": up, "lora": ("ink", lora_path, 0.8)},
        ),
        ({"prompt": "a house", "seed": 3}, {}),
        ({"prompt": "a house", "seed": 5, "loras": [{"name": name, "scale": 0.8}]}, {"lora": ("ink", lora_path, 0.8)}),
    ]
    # All four wait behind a held batch, then go together (8 rows): concurrent by construction, at any speed.
    with ThreadPoolExecutor(4) as pool, HeldDenoiser(style_app) as held:
        futures = [pool.submit(post, style_app, "/v1/generate", {**BASE, **extra}) for extra, _ in cases]
        held.wait_waiting(4)
        held.release()
        served = [image_of(f.result()) for f in futures]
    for (extra, ref_kwargs), image in zip(cases, served, strict=True):
        ref = reference(tiny, ip_dir, image_encoder, extra["prompt"], extra["seed"], **ref_kwargs)
        assert np.abs(image.astype(int) - ref).max() <= 1, extra["prompt"]


def test_a_job_takes_a_style_image(style_app):
    body = {**BASE, "prompt": "a lighthouse", "seed": 6, "style_image": png_b64(picture(3)), "style_scale": 1.2}
    direct = image_of(post(style_app, "/v1/generate", body))
    r = post(style_app, "/v1/jobs", body)
    assert r.status_code == 202, r.text
    url = style_app.url + f"/v1/jobs/{r.json()['id']}"
    job = wait_until(
        lambda: (j := requests.get(url, timeout=30).json())["status"] in ("done", "failed") and j,
        "the job",
        timeout_s=300,
        interval_s=0.5,
    )
    assert job["status"] == "done", job
    data = base64.b64decode(job["images"][0]["b64"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), direct)
    # Bad input is refused before the job is queued, naming the field.
    bad = post(style_app, "/v1/jobs", {**body, "style_scale": 5})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "style_scale"
