"""The AUTOMATIC1111 API end to end: real HTTP, the same planner and graph as the native API."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from lora_helpers import UNET_ATTN, make_peft_lora_file

pytestmark = pytest.mark.e2e
SMALL = {"width": 64, "height": 64, "steps": 3}


def txt2img(cluster, body, **kw):
    return requests.post(cluster.url + "/sdapi/v1/txt2img", json=body, timeout=300, **kw)


def generate(cluster, body):
    r = requests.post(cluster.url + "/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def test_txt2img_equals_native_generate_with_a1111_seeds(cluster):
    body = {"prompt": "a red boat", "seed": 5, "sampler_name": "Euler", "cfg_scale": 7.5, "batch_size": 2, "n_iter": 2}
    r = txt2img(cluster, {**body, **SMALL})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6, 7, 8]
    assert (info["sampler_name"], info["steps"], info["width"], info["height"]) == ("Euler", 3, 64, 64)
    assert info["sd_model_name"] == "tiny-sd" and info["ignored_fields"] == []
    assert info["infotexts"][2].endswith(
        "Seed: 7, Size: 64x64, Model hash: " + info["sd_model_hash"] + ", Model: tiny-sd, Version: lorafleet"
    )
    assert out["parameters"]["prompt"] == "a red boat" and out["parameters"]["n_iter"] == 2
    assert len(out["images"]) == 4
    assert all(png(b).size == (64, 64) for b in out["images"])
    native = generate(
        cluster,
        {"prompt": "a red boat", "seed": 5, "scheduler": "euler", "guidance_scale": 7.5, "num_images": 4, **SMALL},
    )
    assert [im["b64"] for im in native["images"]] == out["images"]
    assert len(set(out["images"])) == 4


def test_random_seed_is_reported_and_reproduces_the_image(cluster):
    out = txt2img(cluster, {"prompt": "a tree", "seed": -1, **SMALL}).json()
    seed = json.loads(out["info"])["seed"]
    assert out["parameters"]["seed"] == -1 and 0 <= seed < 2**32
    again = txt2img(cluster, {"prompt": "a tree", "seed": seed, **SMALL}).json()
    assert again["images"] == out["images"]


# Every listed sampler, end to end: tests/test_e2e_samplers.py.


def test_sd_models(cluster):
    models = requests.get(cluster.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert len(models) == 1
    m = models[0]
    assert m["model_name"] == "tiny-sd" and m["filename"] == "tiny-sd"  # the storage URI is for admins only
    assert m["title"] == f"tiny-sd [{m['hash']}]" and len(m["hash"]) == 10 and m["sha256"].startswith(m["hash"])
    admin = requests.get(cluster.url + "/sdapi/v1/sd-models", headers=cluster.admin, timeout=30).json()
    assert admin[0]["filename"] == "builtin:tiny-sd"


@pytest.mark.parametrize(
    "body, status, code, field, text",
    [
        ({"sampler_name": "DPM fast"}, 422, "invalid_value", "sampler_name", "'Euler a'"),
        ({"sampler_index": "nope"}, 422, "invalid_value", "sampler_index", "unknown sampler 'nope'"),
        ({"steps": 999}, 422, "invalid_value", "steps", "steps must be in [1, 150], got 999"),
        ({"steps": "20"}, 422, "invalid_value", "steps", "steps"),
        ({"cfg_scale": 99.0}, 422, "invalid_value", "cfg_scale", "cfg_scale must be in [0, 30.0]"),
        ({"batch_size": 3, "n_iter": 3}, 422, "invalid_value", "n_iter", "got 3 × 3 = 9"),
        ({"width": 65}, 422, "invalid_value", "width", "multiple of 8"),
        ({"seed": -5}, 422, "invalid_value", "seed", "seed"),
        ({"prompt": ""}, 422, "invalid_value", "prompt", "prompt must not be empty"),
        ({"prompt": "a <lora:no-such-style:0.5>"}, 404, "adapter_not_found", "prompt", "no-such-style"),
    ],
)
def test_bad_input_names_the_a1111_field(cluster, body, status, code, field, text):
    r = txt2img(cluster, {"prompt": "a boat", **SMALL, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert text in error["message"]


def test_malformed_json_is_a_400(cluster):
    r = requests.post(
        cluster.url + "/sdapi/v1/txt2img", data="{nope", headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.fixture(scope="module")
def ink(cluster, tiny, tmp_path_factory):
    """An adapter registered over HTTP, as an operator would: with a description and trigger words."""
    path = make_peft_lora_file(
        tiny, tmp_path_factory.mktemp("a1111-lora"), seed=21, rank=4, alpha=4, unet_targets=UNET_ATTN
    )
    with open(path, "rb") as f:
        r = requests.post(
            cluster.url + "/v1/adapters",
            files={"file": (path.name, f)},
            data={"name": "a1111-ink", "description": "Ink wash", "trigger_words": "ink style, brush", "tags": "art"},
            headers=cluster.admin,
            timeout=120,
        )
    assert r.status_code == 201, r.text
    return r.json()


def test_loras_lists_registered_adapters_without_the_admin_token(cluster, ink):
    r = requests.get(cluster.url + "/sdapi/v1/loras", timeout=30)
    assert r.status_code == 200
    entry = next(e for e in r.json() if e["name"] == "a1111-ink")
    assert entry["alias"] == "a1111-ink" and entry["path"] == f"a1111-ink@{ink['version']}"
    meta = entry["metadata"]
    assert (meta["description"], meta["trigger_words"], meta["tags"]) == ("Ink wash", ["ink style", "brush"], ["art"])
    assert meta["versions"] == [ink["version"]] and meta["latest_version"] == ink["version"]


def test_lora_prompt_tag_applies_the_adapter_like_native_loras(cluster, ink):
    r = txt2img(cluster, {"prompt": "a boat <lora:a1111-ink:0.8>", "seed": 9, "sampler_name": "DDIM", **SMALL})
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["loras"] == [{"ref": f"a1111-ink@{ink['version']}", "scale": 0.8}]
    assert f"Lora: a1111-ink@{ink['version']}:0.8" in info["infotexts"][0]
    assert info["prompt"] == "a boat <lora:a1111-ink:0.8>"  # echoed as sent, as A1111 does
    common = {"seed": 9, "scheduler": "ddim", "guidance_scale": 7.0, **SMALL}
    native = generate(cluster, {"prompt": "a boat", "loras": [{"name": "a1111-ink", "scale": 0.8}], **common})
    plain = generate(cluster, {"prompt": "a boat", **common})
    assert out["images"][0] == native["images"][0]["b64"]
    assert out["images"][0] != plain["images"][0]["b64"]


def test_an_a1111_client_call_sequence(cluster, ink):
    """What A1111 clients (webuiapi, Krita/Photoshop plug-ins, bots) do: list, pick, send their full payload."""
    session = requests.Session()
    model = session.get(cluster.url + "/sdapi/v1/sd-models", timeout=30).json()[0]
    sampler = next(
        s for s in session.get(cluster.url + "/sdapi/v1/samplers", timeout=30).json() if s["name"] == "Euler a"
    )
    lora = next(e for e in session.get(cluster.url + "/sdapi/v1/loras", timeout=30).json() if e["name"] == "a1111-ink")
    trigger = lora["metadata"]["trigger_words"][0]
    payload = {  # webuiapi's txt2img defaults, as it sends them
        "enable_hr": False,
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "prompt": f"{trigger}, a harbour <lora:{lora['alias']}:1>",
        "styles": [],
        "seed": 77,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "sampler_name": sampler["name"],
        "batch_size": 2,
        "n_iter": 1,
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "blurry",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {"sd_model_checkpoint": model["title"]},
        "override_settings_restore_afterwards": True,
        "script_args": [],
        "sampler_index": "Euler",
        "script_name": None,
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    r = session.post(cluster.url + "/sdapi/v1/txt2img", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["ignored_fields"] == ["eta"]  # sd_model_checkpoint is honoured: it picks the served model
    assert info["all_seeds"] == [77, 78] and info["sampler_name"] == "Euler a"
    assert info["loras"] == [{"ref": lora["path"], "scale": 1.0}]
    assert out["parameters"]["override_settings"] == {"sd_model_checkpoint": model["title"]}
    images = [np.asarray(png(b).convert("RGB")) for b in out["images"]]
    assert [im.shape for im in images] == [(64, 64, 3)] * 2
    assert np.abs(images[0].astype(int) - images[1]).max() > 10
