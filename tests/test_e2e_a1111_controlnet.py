"""A1111's ControlNet IP-Adapter unit with the real ``webuiapi`` client, through Ray Serve and real HTTP (issue 22):
the extension's listing routes, ``txt2img`` / ``img2img`` with ``webuiapi.ControlNetUnit`` equal to the native API
with ``style_image`` / ``style_scale`` (pixel for pixel), and what is refused as the client shows it. Against an app
served with its builtin IP-Adapter under a route prefix (``style_app``). (The mapping's rules, in-process:
tests/test_a1111_controlnet.py.)"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image
from style_app import deployed

pytestmark = pytest.mark.e2e
# webuiapi's txt2img / img2img default ``alwayson_scripts={}`` is one dict shared by every call in the process, and
# a call with ControlNet units writes them into it: a later call without units (another test's) would send them
# again. Each call here passes a dict of its own.
SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 11, "cfg_scale": 7.5, "sampler_name": "Euler"}
NATIVE = {"width": 64, "height": 64, "steps": 3, "seed": 11, "guidance_scale": 7.5, "scheduler": "euler"}


def reference() -> Image.Image:
    """A style image: a colored gradient, so the encoder sees structure."""
    y, x = np.mgrid[0:48, 0:48]
    return Image.fromarray(np.stack([x * 5, y * 5, (x + y) * 2], axis=-1).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def native(url: str, path: str, body: dict) -> np.ndarray:
    r = requests.post(url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64"]))))


@pytest.fixture(scope="module")
def styled(cluster, cache_dir, tmp_path_factory):
    with deployed(cluster, cache_dir, tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def api(styled) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=styled + "/sdapi/v1")


def test_the_listings_name_the_served_ip_adapter(api, styled, cluster):
    get = lambda path: requests.get(styled + path, timeout=30).json()  # noqa: E731
    assert get("/controlnet/version") == {"version": 3}
    models = get("/controlnet/model_list")["model_list"]
    assert get("/v1/models")["data"][0]["style_image"] is True
    assert len(models) == 1 and models[0].startswith("ip-adapter_tiny-sd [")
    assert get("/controlnet/module_list")["module_list"] == [
        "ip-adapter-auto",
        "ip-adapter_clip_h",
        "ip-adapter_clip_g",
    ]
    # webuiapi's own helpers ask the host's root app (they drop the route prefix): it lists what it serves
    root = webuiapi.WebUIApi(baseurl=cluster.url + "/sdapi/v1")
    served = [m for m in requests.get(cluster.url + "/v1/models", timeout=30).json()["data"] if m["style_image"]]
    assert root.controlnet_version() == 3 and len(root.controlnet_model_list()) == len(served)
    assert root.controlnet_module_list() == (list(a1111_modules()) if served else [])


def a1111_modules():
    return ("ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g")


def test_txt2img_with_an_ip_adapter_unit_equals_the_native_style_image(api, styled):
    (model,) = requests.get(styled + "/controlnet/model_list", timeout=30).json()["model_list"]
    unit = webuiapi.ControlNetUnit(image=reference(), module="ip-adapter_clip_h", model=model, weight=0.8)
    result = api.txt2img(prompt="a red boat", controlnet_units=[unit], **SMALL, alwayson_scripts={})
    style = webuiapi.raw_b64_img(reference())
    expected = native(
        styled, "/v1/generate", {"prompt": "a red boat", "style_image": style, "style_scale": 0.8, **NATIVE}
    )
    assert np.array_equal(pixels(result.image), expected)
    plain = native(styled, "/v1/generate", {"prompt": "a red boat", **NATIVE})
    assert not np.array_equal(expected, plain)  # the style image moved pixels: the unit was not dropped
    assert result.info["extra_generation_params"]["ControlNet 0"] == (
        f"Module: ip-adapter_clip_h, Model: {model}, Weight: 0.8"
    )
    assert "alwayson_scripts" not in result.info["ignored_fields"]  # the ControlNet script was read


def test_img2img_with_an_ip_adapter_unit_equals_the_native_img2img(api, styled):
    init = Image.fromarray(np.full((64, 64, 3), (30, 120, 200), np.uint8))
    unit = webuiapi.ControlNetUnit(image=reference(), module="ip-adapter-auto", model="ip-adapter_sd15", weight=0.5)
    result = api.img2img(
        images=[init], prompt="a house", denoising_strength=0.6, controlnet_units=[unit], **SMALL, alwayson_scripts={}
    )
    body = {
        "prompt": "a house",
        "image": webuiapi.raw_b64_img(init),
        "strength": 0.6,
        "style_image": webuiapi.raw_b64_img(reference()),
        "style_scale": 0.5,
        **NATIVE,
    }
    assert np.array_equal(pixels(result.image), native(styled, "/v1/img2img", body))


@pytest.mark.parametrize(
    "units, field",
    [
        (
            [webuiapi.ControlNetUnit(image=reference(), module="canny", model="control_v11p_sd15_canny")],
            "args[0].module",
        ),
        (
            [
                webuiapi.ControlNetUnit(image=reference(), module="ip-adapter_clip_h", model="ip-adapter_sd15"),
                webuiapi.ControlNetUnit(image=reference(), module="ip-adapter_clip_h", model="ip-adapter_sd15"),
            ],
            "args[1]",
        ),
        (
            [
                webuiapi.ControlNetUnit(
                    image=reference(), module="ip-adapter_clip_h", model="ip-adapter_sd15", weight=2.5
                )
            ],
            "args[0].weight",
        ),
        (
            [
                webuiapi.ControlNetUnit(
                    image=reference(), module="ip-adapter_clip_h", model="ip-adapter_sd15", guidance_start=0.3
                )
            ],
            "args[0].guidance_start",
        ),
    ],
)
def test_what_is_not_served_is_a_422_the_client_shows(api, units, field):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a", controlnet_units=units, **SMALL, alwayson_scripts={})
    status, text = e.value.args
    error = json.loads(text)["error"]
    assert status == 422 and error["field"] == f"alwayson_scripts.ControlNet.{field}", error
    assert "\n" not in error["message"] and "Traceback" not in text
