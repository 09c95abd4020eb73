"""Adapters end to end: register over HTTP into the S3 registry (moto), generate with them at once, and
match diffusers' pipeline with load_lora_weights + set_adapters on the same files."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from engine_helpers import Engine
from lora_helpers import UNET_ATTN, make_peft_lora_file, peft_to_kohya_file

pytestmark = pytest.mark.e2e
SMALL = {"width": 64, "height": 64, "steps": 5, "scheduler": "ddim"}


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-loras")
    peft = make_peft_lora_file(
        tiny,
        root / "peft",
        seed=11,
        rank=4,
        alpha=6,
        unet_targets=[*UNET_ATTN, "ff.net.2"],
        text_targets=["q_proj", "v_proj"],
    )
    other = make_peft_lora_file(tiny, root / "other", seed=12, rank=2, alpha=2, unet_targets=["to_k", "proj_out"])
    # UNet only: diffusers 0.42.1 under transformers 5 drops (or fails on) the text-encoder part of
    # kohya files, so it could not serve as the reference for one (tests/test_registry_formats.py
    # checks our kohya text-encoder conversion against diffusers-format weights instead).
    kohya = peft_to_kohya_file(
        make_peft_lora_file(tiny, root / "k", seed=13, rank=4, alpha=4, unet_targets=[*UNET_ATTN, "proj_in"]),
        root / "kohya" / "civitai_style.safetensors",
        alpha=2.0,
    )
    resnet = make_peft_lora_file(tiny, root / "resnet", seed=14, rank=2, alpha=2, unet_targets=["conv1"])
    return {"peft": peft, "other": other, "kohya": kohya, "resnet": resnet}


def register(cluster, path, name, headers=None, **fields):
    with open(path, "rb") as f:
        return requests.post(
            cluster.url + "/v1/adapters",
            files={"file": (path.name, f)},
            data={"name": name, **fields},
            headers=cluster.admin if headers is None else headers,
            timeout=120,
        )


def generate(cluster, body):
    r = requests.post(cluster.url + "/v1/generate", json=body, timeout=300)
    return r


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def diffusers_reference(tiny, loras, prompt, seed):
    """diffusers alone: load_lora_weights(file) per adapter, set_adapters(names, weights)."""
    from deployments.engine.batch_invariance import make_batch_invariant
    from deployments.engine.images import to_uint8

    ref = Engine(tiny)
    pipe = ref.pipeline("ddim")
    for name, path, _ in loras:
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters([n for n, _, _ in loras], adapter_weights=[w for _, _, w in loras])
    make_batch_invariant(pipe.unet)
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return to_uint8(out)[0]


@pytest.fixture(scope="module")
def registered(cluster, files):
    out = {}
    for name, key in (("ink", "peft"), ("pastel", "other"), ("civitai-style", "kohya")):
        r = register(cluster, files[key], name, description=f"{name} style", trigger_words="inky, bold", tags="demo")
        assert r.status_code == 201, r.text
        out[name] = r.json()
    return out


def test_writes_need_the_admin_token(cluster, files):
    r = register(cluster, files["peft"], "nope", headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = register(cluster, files["peft"], "nope", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = requests.delete(cluster.url + "/v1/adapters/ink", timeout=30)
    assert r.status_code == 401
    assert requests.get(cluster.url + "/v1/adapters/nope", timeout=30).status_code == 404


def test_registration_manifest_and_listing(cluster, registered):
    ink = registered["ink"]
    assert (ink["name"], ink["version"], ink["source_format"]) == ("ink", 1, "diffusers")
    assert ink["has_text_encoder"] is True and ink["rank"] == 4 and ink["alpha"] == 6
    assert ink["trigger_words"] == ["inky", "bold"] and ink["tags"] == ["demo"]
    assert registered["civitai-style"]["source_format"] == "kohya"
    listing = requests.get(cluster.url + "/v1/adapters", params={"tag": "demo"}, timeout=30).json()
    assert [item["name"] for item in listing["data"]] == ["civitai-style", "ink", "pastel"]
    page = requests.get(cluster.url + "/v1/adapters", params={"limit": 2}, timeout=30).json()
    assert len(page["data"]) == 2 and page["next"] == page["data"][1]["name"]
    shown = requests.get(cluster.url + "/v1/adapters/ink@1", timeout=30).json()
    assert shown["ref"] == "ink@1" and shown["versions"] == [1]


def test_served_lora_equals_diffusers(cluster, registered, files, tiny):
    body = {"prompt": "a harbour", "seed": 21, "loras": [{"name": "ink", "scale": 0.8}], **SMALL}
    r = generate(cluster, body)
    assert r.status_code == 200, r.text
    assert r.json()["loras"] == [{"ref": "ink@1", "scale": 0.8}]
    served = pixels(r.json()["images"][0]["b64"])
    ref = diffusers_reference(tiny, [("ink", files["peft"], 0.8)], "a harbour", 21)
    assert np.abs(served.astype(int) - ref).max() <= 1
    base = pixels(generate(cluster, {"prompt": "a harbour", "seed": 21, **SMALL}).json()["images"][0]["b64"])
    assert np.abs(served.astype(int) - base).max() > 20  # the adapter really changes the image


def test_two_adapters_composed_equal_diffusers(cluster, registered, files, tiny):
    loras = [{"name": "ink", "scale": 0.5}, {"name": "pastel", "version": 1, "scale": 1.5}]
    r = generate(cluster, {"prompt": "a harbour", "seed": 22, "loras": loras, **SMALL})
    ref = diffusers_reference(tiny, [("ink", files["peft"], 0.5), ("pastel", files["other"], 1.5)], "a harbour", 22)
    assert np.abs(pixels(r.json()["images"][0]["b64"]).astype(int) - ref).max() <= 1


def test_kohya_file_served_equals_diffusers_load_lora_weights(cluster, registered, files, tiny):
    r = generate(cluster, {"prompt": "a lantern", "seed": 23, "loras": [{"name": "civitai-style"}], **SMALL})
    assert r.status_code == 200, r.text
    ref = diffusers_reference(tiny, [("civitai", files["kohya"], 1.0)], "a lantern", 23)
    assert np.abs(pixels(r.json()["images"][0]["b64"]).astype(int) - ref).max() <= 1


def test_openai_model_names_an_adapter(cluster, registered):
    import openai

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="tenant-key")
    result = client.images.generate(
        model="tiny-sd:ink@1",
        prompt="a harbour",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 21, "steps": 5, "scheduler": "ddim"},
    )
    native = generate(cluster, {"prompt": "a harbour", "seed": 21, "loras": [{"name": "ink", "scale": 1.0}], **SMALL})
    assert result.data[0].b64_json == native.json()["images"][0]["b64"]
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        client.images.generate(model="tiny-sd:nosuch", prompt="x", size="64x64", response_format="b64_json")


BAD = [
    ([{"name": "nosuch"}], 404, "adapter_not_found", "loras[0]"),
    ([{"name": "ink", "version": 9}], 404, "adapter_not_found", "loras[0]"),
    ([{"name": "ink", "scale": 4.5}], 422, "invalid_value", "loras[0].scale"),
    ([{"name": "ink", "scale": -1}], 422, "invalid_value", "loras[0].scale"),
    ([{"name": "Bad Name!"}], 422, "invalid_value", "loras[0]"),
    ([{"name": "ink"}, {"name": "ink"}], 422, "invalid_value", "loras[1]"),
    ([{"name": "ink"}] * 5, 422, "invalid_value", "loras"),
]


@pytest.mark.parametrize("loras, status, code, field", BAD)
def test_bad_adapter_requests(cluster, registered, loras, status, code, field):
    before = cluster.stats("Denoiser")["ticks"]
    r = generate(cluster, {"prompt": "x", "loras": loras, **SMALL})
    assert r.status_code == status, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field)
    assert cluster.stats("Denoiser")["ticks"] == before


def test_locon_on_resnet_convs_registers_and_is_served_equal_to_diffusers(cluster, files, tiny):
    """Never "registers, then 422" (#18): the default targets reach every UNet Linear/Conv2d, so a LoCon
    adapter (3x3 resnet convs) is served, equal to diffusers with the same file."""
    assert register(cluster, files["resnet"], "resnet-locon").status_code == 201
    r = generate(cluster, {"prompt": "a harbour", "seed": 23, "loras": [{"name": "resnet-locon"}], **SMALL})
    assert r.status_code == 200, r.text
    served = pixels(r.json()["images"][0]["b64"])
    ref = diffusers_reference(tiny, [("resnet-locon", files["resnet"], 1.0)], "a harbour", 23)
    assert np.abs(served.astype(int) - ref).max() <= 1
    base = pixels(generate(cluster, {"prompt": "a harbour", "seed": 23, **SMALL}).json()["images"][0]["b64"])
    assert np.abs(served.astype(int) - base).max() > 4  # the adapter really changes the image


def test_bad_uploads_leave_nothing(cluster):
    before = requests.get(cluster.url + "/v1/adapters", timeout=30).json()["data"]
    import pickle

    r = requests.post(
        cluster.url + "/v1/adapters",
        files={"file": ("x.ckpt", pickle.dumps({"a": 1}))},
        data={"name": "pickled"},
        headers=cluster.admin,
        timeout=30,
    )
    assert r.status_code == 422, r.text
    r = requests.post(
        cluster.url + "/v1/adapters",
        files={"file": ("x.safetensors", b"\x00" * 4)},
        data={"name": "Bad Name"},
        headers=cluster.admin,
        timeout=30,
    )
    assert r.status_code == 422
    assert requests.get(cluster.url + "/v1/adapters", timeout=30).json()["data"] == before


def test_repeated_requests_stop_causing_loads(cluster, registered):
    body = {"prompt": "steady", "loras": [{"name": "pastel"}], **SMALL}
    assert generate(cluster, {**body, "seed": 1}).status_code == 200
    loads = cluster.stats("Denoiser")["adapters"]["loads"]
    for seed in range(2, 6):
        assert generate(cluster, {**body, "seed": seed}).status_code == 200
    stats = cluster.stats("Denoiser")["adapters"]
    assert stats["loads"] == loads and "pastel@1" in stats["resident"]


def test_new_version_and_deletion_take_effect(cluster, files):
    import time

    assert register(cluster, files["other"], "ephemeral").status_code == 201
    assert register(cluster, files["peft"], "ephemeral").json()["version"] == 2
    r = generate(cluster, {"prompt": "x", "seed": 1, "loras": [{"name": "ephemeral"}], **SMALL})
    assert r.json()["loras"] == [{"ref": "ephemeral@2", "scale": 1.0}]
    r = requests.delete(cluster.url + "/v1/adapters/ephemeral", headers=cluster.admin, timeout=30)
    assert r.status_code == 200 and sorted(r.json()["deleted"]) == ["ephemeral@1", "ephemeral@2"]
    names = [a["name"] for a in requests.get(cluster.url + "/v1/adapters", timeout=30).json()["data"]]
    assert "ephemeral" not in names  # gone from listings at once
    time.sleep(1.5)  # the e2e config's manifest_ttl_s is 1 s: the bound on serving a deleted version
    r = generate(cluster, {"prompt": "x", "seed": 1, "loras": [{"name": "ephemeral", "version": 2}], **SMALL})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
