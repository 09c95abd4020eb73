"""Samplers end to end, over real HTTP on Ray Serve: every sampler A1111's API lists runs, under its A1111 name
and schedule, through the real ``webuiapi`` client too, and gives the native API's image for the same scheduler;
``/v1/models`` lists each model's scheduler names. (Each name's exactness against diffusers: test_samplers.py.)"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from deployments.engine.schedulers import SCHEDULER_NAMES

pytestmark = pytest.mark.e2e
SMALL = {"width": 64, "height": 64, "steps": 3}


def txt2img(cluster, body):
    return requests.post(
        cluster.url + "/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 3, **SMALL, **body}, timeout=300
    )


def native(cluster, scheduler: str, **body) -> str:
    r = requests.post(
        cluster.url + "/v1/generate",
        json={"prompt": "a cat", "seed": 3, "guidance_scale": 7.0, "scheduler": scheduler, **SMALL, **body},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()["images"][0]["b64"]


def test_every_listed_sampler_runs_and_they_differ(cluster):
    samplers = requests.get(cluster.url + "/sdapi/v1/samplers", timeout=30).json()
    assert [s["name"] for s in samplers] == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Euler a", "Euler", "LMS",
        "Heun", "DPM2", "DPM2 a", "DDIM", "UniPC", "LCM", "PLMS",
    ]  # fmt: skip
    images = {}
    for s in samplers:  # 5 steps: DPM++ 3M SDE takes a third-order step (below 5, it is DPM++ 2M SDE)
        r = txt2img(cluster, {"sampler_name": s["name"], "steps": 5})
        assert r.status_code == 200, (s["name"], r.text)
        info = json.loads(r.json()["info"])
        assert (info["sampler_name"], info["lorafleet_scheduler"]) == (s["name"], s["options"]["lorafleet_scheduler"])
        images[s["name"]] = r.json()["images"][0]
    alike = [n for n, image in images.items() if list(images.values()).count(image) > 1]
    assert alike == [] and len(images) == len(samplers)
    # An alias and lorafleet's own name are the same sampler; the native API gives the same image.
    assert txt2img(cluster, {"sampler_name": "k_dpm_2_a", "steps": 5}).json()["images"][0] == images["DPM2 a"]
    assert native(cluster, "dpm2_a_karras", steps=5) == images["DPM2 a"]


def test_dpmpp_2m_karras_through_webuiapi_equals_the_native_scheduler(cluster):
    api = webuiapi.WebUIApi(baseurl=cluster.url + "/sdapi/v1")
    result = api.txt2img(
        prompt="a cat", seed=3, sampler_name="DPM++ 2M Karras", scheduler="Karras", cfg_scale=7.0, **SMALL
    )
    assert result.info["sampler_name"] == "DPM++ 2M" and result.info["lorafleet_scheduler"] == "dpmpp_2m_karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in result.info["infotexts"][0]
    ours = np.asarray(result.image.convert("RGB"))
    theirs = np.asarray(Image.open(io.BytesIO(base64.b64decode(native(cluster, "dpmpp_2m_karras")))).convert("RGB"))
    assert np.array_equal(ours, theirs)
    # A1111 >= 1.9: the combined name, or the plain name with scheduler "Automatic" (DPM++ 2M's own: Karras)
    plain = txt2img(cluster, {"sampler_name": "DPM++ 2M", "scheduler": "Automatic", "cfg_scale": 7.0}).json()
    assert json.loads(plain["info"])["lorafleet_scheduler"] == "dpmpp_2m_karras"
    uniform = txt2img(cluster, {"sampler_name": "DPM++ 2M", "scheduler": "Uniform", "cfg_scale": 7.0}).json()
    assert uniform["images"][0] == native(cluster, "dpmpp_2m_uniform") != plain["images"][0]


@pytest.mark.parametrize(
    "body, field, text",
    [
        ({"sampler_name": "Euler", "scheduler": "Polyexponential"}, "scheduler", "unknown scheduler 'Polyexponential'"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler", "takes no 'Karras' schedule"),
        ({"sampler_name": "DPM++ 2S a Karras"}, "sampler_name", "unknown sampler 'DPM++ 2S a Karras'"),
    ],
)
def test_unoffered_samplers_and_schedules_are_a_422_naming_the_field(cluster, body, field, text):
    r = txt2img(cluster, body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == field and text in error["message"] and "choose one of [" in error["message"]


def test_models_list_their_schedulers_and_the_native_api_takes_them(cluster):
    (model,) = requests.get(cluster.url + "/v1/models", timeout=30).json()["data"]
    assert model["schedulers"] == list(SCHEDULER_NAMES)
    # diffusers' class names stand for their samplers
    assert native(cluster, "HeunDiscreteScheduler", steps=2) == native(cluster, "heun", steps=2)
    r = requests.post(cluster.url + "/v1/generate", json={"prompt": "a", "scheduler": "euler_a_karras"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["field"] == "scheduler"
    assert "euler_a takes no karras schedule; it takes uniform, sgm_uniform" in r.json()["error"]["message"]
