"""SDXL end to end: ``builtin:tiny-sdxl`` served through real HTTP, beside the session's SD1 app.

A second application on the session's Ray instance (``cluster``): its own TextEncoder (both encoders),
Denoiser, VAE, Jobs and ingress under the route prefix ``/sdxl``, with a local adapter registry. Small
(64 x 64, 3-4 steps). The served image equals ``StableDiffusionXLPipeline`` loaded from the model's
directory (default scheduler, same seed; its UNet on the batch-invariant kernels the server uses on the
CPU) within one PNG level, with and without size/crop conditioning; the OpenAI client, A1111 and jobs
work on it; and an SDXL-only field sent to the SD1 app is a 422 naming the field.
"""

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from conftest import ADMIN_TOKEN, assert_clean_error

pytestmark = pytest.mark.e2e

APP, PREFIX = "lorafleet-sdxl", "/sdxl"
SMALL = {"width": 64, "height": 64, "steps": 4}


class SDXLApp:
    def __init__(self, url: str):
        self.url = url

    def post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=300, **kw)


@pytest.fixture(scope="module")
def sdxl(cluster, cache_dir, tiny_sdxl_dir, tmp_path_factory):
    """tiny-sdxl as a second Serve application on the session's Ray instance, deleted after the module."""
    from ray import serve

    from graph.app import build_app

    from conftest import wait_until

    root = tmp_path_factory.mktemp("sdxl-app")
    config = {
        "model": {"uri": "builtin:tiny-sdxl", "cache_dir": str(cache_dir)},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "admin": {"token": ADMIN_TOKEN},
        "denoiser": {"max_rows_per_tick": 8},
    }
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    app = SDXLApp(cluster.url + PREFIX)

    def ready() -> bool:
        try:
            return requests.get(app.url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the SDXL app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield app
    finally:
        serve.delete(APP)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir):
    """diffusers' own SDXL pipeline from the model's directory, as a user would load it."""
    from diffusers import StableDiffusionXLPipeline

    from deployments.engine.batch_invariance import make_batch_invariant

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False)
    pipe.unet = make_batch_invariant(pipe.unet)  # the kernels the server's Denoiser runs on the CPU
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    # body (besides SMALL), diffusers' arguments for the same image
    (
        {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 11, "guidance_scale": 5.0},
        {"negative_prompt": "blurry"},
    ),
    (
        {
            "prompt": "a red boat",
            "seed": 12,
            "guidance_scale": 6.0,
            "original_size": [512, 384],
            "crops_coords_top_left": [32, 16],
        },
        {"negative_prompt": None, "original_size": (512, 384), "crops_coords_top_left": (32, 16)},
    ),
]


@pytest.mark.parametrize("body, diffusers_args", CASES, ids=["negative-prompt", "micro-conditioning"])
def test_served_image_equals_stable_diffusion_xl_pipeline(sdxl, reference, body, diffusers_args):
    from deployments.engine.images import to_uint8

    r = sdxl.post("/v1/generate", {**body, **SMALL}, headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-model"] == "tiny-sdxl"
    served = pixels(r.content)
    expected = reference(
        body["prompt"],
        height=64,
        width=64,
        num_inference_steps=SMALL["steps"],
        guidance_scale=body["guidance_scale"],
        generator=torch.Generator().manual_seed(body["seed"]),
        output_type="pt",
        **diffusers_args,
    ).images
    assert served.shape == (64, 64, 3)
    assert np.abs(served.astype(int) - to_uint8(expected)[0]).max() <= 1
    # the conditioning is not ignored: without it the image differs
    if "original_size" in body:
        plain = {k: v for k, v in body.items() if k not in ("original_size", "crops_coords_top_left")}
        other = sdxl.post("/v1/generate", {**plain, **SMALL}, headers={"Accept": "image/png"})
        assert np.abs(pixels(other.content).astype(int) - served).max() > 4


def test_openai_client_gets_an_sdxl_image(sdxl):
    import openai

    client = openai.OpenAI(base_url=sdxl.url + "/v1", api_key="not-needed")
    assert [(m.id, m.model_extra["kind"]) for m in client.models.list()] == [("tiny-sdxl", "sdxl")]
    result = client.images.generate(
        model="tiny-sdxl",
        prompt="a lighthouse",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 3},
    )
    image = pixels(base64.b64decode(result.data[0].b64_json))
    native = sdxl.post("/v1/generate", {"prompt": "a lighthouse", "seed": 3, "steps": 3, "width": 64, "height": 64})
    assert native.status_code == 200, native.text
    assert result.data[0].b64_json == native.json()["images"][0]["b64"] and image.shape == (64, 64, 3)
    # no size: the model's native one (tiny-sdxl: 256)
    result = client.images.generate(model="tiny-sdxl", prompt="x", response_format="b64_json", extra_body={"steps": 1})
    assert pixels(base64.b64decode(result.data[0].b64_json)).shape == (256, 256, 3)
    with pytest.raises(openai.UnprocessableEntityError, match="limits.max_side"):
        client.images.generate(model="tiny-sdxl", prompt="x", size="2048x2048", response_format="b64_json")


def test_a1111_txt2img_and_img2img_on_sdxl(sdxl):
    models = requests.get(sdxl.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert [(m["model_name"], m["kind"]) for m in models] == [("tiny-sdxl", "sdxl")]
    body = {"prompt": "a harbour", "seed": 5, "steps": 3, "cfg_scale": 7, "width": 64, "height": 64}
    r = sdxl.post("/sdapi/v1/txt2img", {**body, "sampler_name": "Euler", "original_size": [1024, 1024]})
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert info["sd_model_name"] == "tiny-sdxl" and info["ignored_fields"] == ["original_size"]
    native = sdxl.post(
        "/v1/generate",
        {**SMALL, "prompt": "a harbour", "seed": 5, "steps": 3, "guidance_scale": 7.0, "scheduler": "euler"},
    )
    assert answer["images"][0] == native.json()["images"][0]["b64"]
    r = sdxl.post("/sdapi/v1/img2img", {**body, "init_images": [answer["images"][0]], "denoising_strength": 0.6})
    assert r.status_code == 200, r.text
    restyled = pixels(base64.b64decode(r.json()["images"][0]))
    assert restyled.shape == (64, 64, 3)


def test_a_job_with_conditioning_gives_the_synchronous_image(sdxl):
    body = {"prompt": "a fox", "seed": 21, "target_size": [128, 128], **SMALL}
    r = sdxl.post("/v1/jobs", body)
    assert r.status_code == 202, r.text
    url = r.json()["url"]
    assert url.startswith(PREFIX + "/v1/jobs/")
    deadline = time.monotonic() + 120
    while (job := requests.get(sdxl.url.removesuffix(PREFIX) + url, timeout=60).json())["status"] not in (
        "done",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "done", job
    sync = sdxl.post("/v1/generate", body)
    assert job["images"][0]["b64"] == sync.json()["images"][0]["b64"]


@pytest.mark.parametrize("field", ["original_size", "negative_crops_coords_top_left"])
def test_an_sdxl_field_sent_to_the_sd1_app_is_a_422_naming_it(cluster, sdxl, field):
    r = requests.post(cluster.url + "/v1/generate", json={"prompt": "x", field: [64, 64], **SMALL}, timeout=60)
    assert r.status_code == 422, r.text
    assert_clean_error(r.text)
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("unsupported_field", field)
    assert error["message"].startswith(f"{field} is SDXL size conditioning; the served model tiny-sd is sd1")
    # and the SDXL app, on the same Ray instance, checks its own limits
    r = sdxl.post("/v1/generate", {"prompt": "x", field: [64, 5000], **SMALL})
    assert r.status_code == 422 and r.json()["error"]["field"] == field
    assert "(4 x limits.max_side: auto for tiny-sdxl)" in r.json()["error"]["message"]


def test_registered_kohya_sdxl_lora_with_both_text_encoders_equals_diffusers(sdxl, tiny_sdxl_dir, tmp_path):
    """A kohya SDXL file as sd-scripts writes it (LDM UNet names, lora_te1_ and lora_te2_) registered over HTTP
    and served: equal to StableDiffusionXLPipeline with the same weights (load_lora_weights + set_adapters)."""
    import safetensors.torch
    from diffusers import StableDiffusionXLPipeline

    from deployments.engine.batch_invariance import make_batch_invariant
    from deployments.engine.images import to_uint8
    from lora_registry.base_model import base_model_spec_from_dir

    from lora_helpers import kohya_to_diffusers_state_dict, write_kohya_sdxl_file

    spec = base_model_spec_from_dir(tiny_sdxl_dir)
    path = write_kohya_sdxl_file(spec, tmp_path / "sdxl-style.safetensors", convention="ldm", seed=5, rank=4)
    with path.open("rb") as f:
        r = requests.post(
            sdxl.url + "/v1/adapters",
            files={"file": (path.name, f)},
            data={"name": "sdxl-style"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=120,
        )
    assert r.status_code in (200, 201), r.text
    manifest = r.json()
    assert manifest["source_format"] == "kohya" and manifest["has_text_encoder"] is True
    body = {"prompt": "a harbour", "negative_prompt": "ugly", "seed": 21, "guidance_scale": 5.0, **SMALL}
    r = sdxl.post(
        "/v1/generate", {**body, "loras": [{"name": "sdxl-style", "scale": 0.8}]}, headers={"Accept": "image/png"}
    )
    assert r.status_code == 200, r.text
    served = pixels(r.content)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    state = kohya_to_diffusers_state_dict(safetensors.torch.load_file(str(path)), pipe.unet.config)
    pipe.load_lora_weights(state, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    make_batch_invariant(pipe.unet)
    expected = pipe(
        body["prompt"],
        negative_prompt="ugly",
        height=64,
        width=64,
        num_inference_steps=SMALL["steps"],
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(21),
        output_type="pt",
    ).images
    assert np.abs(served.astype(int) - to_uint8(expected)[0]).max() <= 1
    plain = sdxl.post("/v1/generate", body, headers={"Accept": "image/png"})
    assert np.abs(pixels(plain.content).astype(int) - served).max() > 4  # the adapter changed the image
