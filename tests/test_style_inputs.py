"""The style step (``graph/style_inputs.py``): ``style_image`` and ``style_scale`` checked before any work is queued.

A table of bad inputs -> status, code, canonical field and a message naming the field and the limit, on the
planner; then the same over the real HTTP app in-process (``ingress_helpers``: the graph and the Jobs store are
fakes that count what reaches them): the native routes and jobs answer the 422 and queue nothing.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from deployments.engine.config import LoRAConfig
from graph.adapters_api import AdapterResolver
from graph.config import LimitsConfig
from graph.errors import FieldError
from graph.planning import Planner
from graph.style_inputs import MAX_STYLE_SCALE, StyleSupport, check_style_scale, image_digest
from graph.validation import GenerationInput

from image_helpers import png_b64
from ingress_helpers import app_config, is_error_shape, make_ingress

pytest_plugins = ["registry_helpers"]

LIMITS = LimitsConfig(max_image_pixels=4096, max_image_bytes=20_000)  # 64 x 64


def picture(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def bomb_b64() -> str:
    """A tiny PNG whose header claims 100000 x 100000 pixels (valid CRC): refused from the header."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = buf.getvalue()
    ihdr = struct.pack(">II", 100_000, 100_000) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return base64.b64encode(png[:16] + ihdr + crc + png[33:]).decode()


STYLE = png_b64(picture())


@pytest.fixture(scope="module")
def support(tiny_dir) -> StyleSupport:
    return StyleSupport.of_unet_config(json.loads((tiny_dir / "unet" / "config.json").read_text()), "plain")


@pytest.fixture(scope="module")
def planner(tiny, served_adapters, support) -> Planner:
    resolver = AdapterResolver(served_adapters, served_adapters.base, LoRAConfig())
    return Planner(tiny["info"], "tiny-sd", LIMITS, tiny["tokenizer"], resolver, style=support)


@pytest.fixture(scope="module")
def plain_planner(tiny, served_adapters) -> Planner:
    """The same model served without IP-Adapter."""
    resolver = AdapterResolver(served_adapters, served_adapters.base, LoRAConfig())
    return Planner(tiny["info"], "tiny-sd", LIMITS, tiny["tokenizer"], resolver)


def test_the_tiny_unets_layout(support):
    assert support.blocks["down"] and support.blocks["up"] and support.mid
    assert support.layers["up"] == support.layers["down"] + 1


BAD = [
    # fields, code, canonical field, message (a part of it)
    ({"style_scale": 0.5}, "invalid_value", "style_scale", "style_scale needs a style_image (IP-Adapter)"),
    ({"style_image": "not base64!"}, "invalid_image", "style_image", "style_image is not valid base64"),
    (
        {"style_image": base64.b64encode(b"hello, not an image").decode()},
        "invalid_image",
        "style_image",
        "style_image is not a PNG, JPEG or WebP image",
    ),
    (
        {"style_image": png_b64(picture(80, 80))},
        "invalid_image",
        "style_image",
        "style_image is 80x80 = 6400 pixels; the limit is 4096 pixels",
    ),
    (
        {"style_image": "A" * 40_000},
        "invalid_image",
        "style_image",
        "style_image is 30000 bytes; the limit is 20000 bytes",
    ),
    ({"style_image": bomb_b64()}, "invalid_image", "style_image", "style_image has too many pixels"),
    (
        {"style_image": "data:image/gif;base64,R0lGODlh"},
        "invalid_image",
        "style_image",
        "style_image: data URL type 'image/gif' is not one of",
    ),
    ({"style_image": STYLE, "style_scale": 2.5}, "invalid_value", "style_scale", "style_scale must be in [0, 2.0]"),
    ({"style_image": STYLE, "style_scale": -0.1}, "invalid_value", "style_scale", "must be in [0, 2.0], got -0.1"),
    ({"style_image": STYLE, "style_scale": float("nan")}, "invalid_value", "style_scale", "must be in [0, 2.0]"),
    ({"style_image": STYLE, "style_scale": float("inf")}, "invalid_value", "style_scale", "must be in [0, 2.0]"),
    (
        {"style_image": STYLE, "style_scale": True},
        "invalid_value",
        "style_scale",
        "style_scale must be a number in [0, 2.0], got True",
    ),
    (
        {"style_image": STYLE, "style_scale": {"left": 1.0}},
        "invalid_value",
        "style_scale.left",
        'style_scale.left: per-block scales name down, mid and up only, e.g. {"up": {"block_',
    ),
    (
        {"style_image": STYLE, "style_scale": {"up": {"block_9": 1.0}}},
        "invalid_value",
        "style_scale.up.block_9",
        "style_scale.up.block_9: the served UNet's up blocks with cross-attention are block_",
    ),
    (
        {"style_image": STYLE, "style_scale": {"up": {"block_1": [1.0, 1.0, 1.0, 1.0, 1.0]}}},
        "invalid_value",
        "style_scale.up.block_1",
        "style_scale.up.block_1 has 5 scales; the served UNet's block has",
    ),
    (
        {"style_image": STYLE, "style_scale": {"down": 3.0}},
        "invalid_value",
        "style_scale.down",
        "style_scale.down must be in [0, 2.0], got 3.0",
    ),
    (
        {"style_image": STYLE, "style_scale": {"up": {"block_1": [0.0, "x"]}}},
        "invalid_value",
        "style_scale.up.block_1[1]",
        "style_scale.up.block_1[1] must be a number in [0, 2.0], got 'x'",
    ),
    (
        {"style_image": STYLE, "style_scale": {"mid": [1.0, 1.0]}},
        "invalid_value",
        "style_scale.mid",
        "style_scale.mid has 2 scales",
    ),
]


@pytest.mark.parametrize("fields, code, field, message", BAD)
def test_bad_style_inputs_name_the_field_and_the_limit(planner, fields, code, field, message):
    with pytest.raises(FieldError) as caught:
        planner.check_inputs(GenerationInput(prompt="a cat", **fields))
    e = caught.value
    assert (e.status, e.code, e.field) == (422, code, field)
    assert message in e.message and "\n" not in e.message


def test_a_model_without_ip_adapter_answers_style_image_unsupported(plain_planner):
    with pytest.raises(FieldError) as caught:
        plain_planner.check_inputs(GenerationInput(prompt="a cat", style_image=STYLE, style_scale=0.5))
    e = caught.value
    assert (e.status, e.code, e.field) == (422, "style_image_unsupported", "style_image")
    assert e.message.startswith("style_image: the model tiny-sd is served without IP-Adapter weights")
    # No style image at all is fine there: the plan has none.
    assert plain_planner.check_inputs(GenerationInput(prompt="a cat")).style_image is None


def test_a_style_request_becomes_its_plan(planner):
    pixels = picture(48, 40, seed=3)
    plan = planner.check_inputs(
        GenerationInput(prompt="a cat", style_image=png_b64(pixels, data_url=True), style_scale=1, tenant="t")
    )
    assert plan.style_image is not None
    assert np.array_equal(plan.style_image.pixels, pixels)
    assert plan.style_image.digest == image_digest(pixels)
    assert plan.style_scale == 1.0 and isinstance(plan.style_scale, float)
    assert plan.denoise_params().style_scale == 1.0
    request = plan.style_request()
    assert request.tenant == "t" and request.digest == plan.style_image.digest
    # The default scale, and no style image: the plan says so.
    assert planner.check_inputs(GenerationInput(prompt="a cat", style_image=STYLE)).style_scale == 1.0
    plain = planner.check_inputs(GenerationInput(prompt="a cat"))
    assert plain.style_image is None and plain.style_request() is None


def test_the_digest_is_of_the_pixels_not_the_file():
    pixels = picture(16, 8)
    webp = io.BytesIO()
    Image.fromarray(pixels).save(webp, format="WEBP", lossless=True)
    from graph.image_decoding import load_image

    decoded = np.asarray(load_image(webp.getvalue(), max_bytes=10**6, max_pixels=10**6))
    assert np.array_equal(decoded, pixels)
    assert image_digest(decoded) == image_digest(pixels)
    assert image_digest(pixels) != image_digest(pixels.reshape(8, 16, 3).copy().reshape(16, 8, 3)[::-1])
    assert image_digest(pixels) != image_digest(pixels.reshape(16, 8, 3))  # same bytes, another size


def test_per_block_scales_keep_their_shape_as_floats(support):
    up = support.blocks["up"][0]
    n = support.layers["up"]
    scale = {"up": {f"block_{up}": [0] * (n - 1) + [1]}, "down": 0.5, "mid": [1]}
    assert check_style_scale(scale, support) == {
        "up": {f"block_{up}": [0.0] * (n - 1) + [1.0]},
        "down": 0.5,
        "mid": [1.0],
    }
    assert check_style_scale(MAX_STYLE_SCALE, support) == MAX_STYLE_SCALE
    assert check_style_scale(0, support) == 0.0


def test_per_block_scales_expand_as_diffusers_expands_them(tiny, support):
    """What the planner accepts, diffusers' own expansion (the Denoiser's) accepts too, and vice versa."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    up, n = support.blocks["up"][0], support.layers["up"]
    for scale in ({"up": {f"block_{up}": [0.0] * (n - 1) + [1.0]}}, {"down": 0.3, "mid": 1.0}, {"up": 1.0}):
        check_style_scale(scale, support)
        _maybe_expand_lora_scales(tiny["unet"], [scale], default_scale=0.0)
    wrong = {"up": {f"block_{up}": [1.0] * (n + 1)}}
    with pytest.raises(FieldError):
        check_style_scale(wrong, support)
    with pytest.raises(ValueError):
        _maybe_expand_lora_scales(tiny["unet"], [wrong], default_scale=0.0)


# -- over HTTP, in-process: nothing is queued -------------------------------------------------


@pytest.fixture
def served(tmp_path, cache_dir, monkeypatch):
    """The real app on a config with ``builtin:tiny-sd`` and its builtin IP-Adapter."""
    config = app_config(tmp_path, cache_dir, model={"ip_adapter": {"uri": "builtin"}})
    return make_ingress(config, monkeypatch)


@pytest.fixture
def served_plain(tmp_path, cache_dir, monkeypatch):
    return make_ingress(app_config(tmp_path, cache_dir), monkeypatch)


ROUTES = {
    "/v1/generate": {},
    "/v1/img2img": {"image": png_b64(picture(64, 64))},
    "/v1/inpaint": {"image": png_b64(picture(64, 64)), "mask": png_b64(np.full((64, 64), 255, np.uint8))},
    "/v1/jobs": {},
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_each_route_answers_the_422_and_queues_nothing(served, route):
    client, ingress = served
    body = {"prompt": "a cat", "steps": 2, **ROUTES[route]}
    for extra, code, field in [
        ({"style_scale": 1.0}, "invalid_value", "style_scale"),
        ({"style_image": "bm90IGFuIGltYWdl"}, "invalid_image", "style_image"),
        ({"style_image": STYLE, "style_scale": 9}, "invalid_value", "style_scale"),
        ({"style_image": STYLE, "style_scale": {"up": {"block_9": 1}}}, "invalid_value", "style_scale.up.block_9"),
    ]:
        r = client.post(route, json={**body, **extra})
        assert r.status_code == 422, (route, extra, r.text)
        assert is_error_shape(r.json())
        assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field)
    assert _plans(ingress) == [] and ingress.jobs.submitted == []
    # A good one reaches the graph (or the Jobs store) with its style image and scale.
    r = client.post(route, json={**body, "style_image": STYLE, "style_scale": {"down": 0.5}})
    assert r.status_code in (200, 202), r.text
    plans = ingress.jobs.submitted if route == "/v1/jobs" else _plans(ingress)
    assert len(plans) == 1
    assert np.array_equal(plans[0].style_image.pixels, picture())
    assert plans[0].style_scale == {"down": 0.5}


def _plans(ingress) -> list:
    return ingress.graph.inner.plans  # FakeGraph's, behind the tenant gate (graph/auth.py)


def test_without_ip_adapter_style_image_unsupported_over_http(served_plain):
    client, ingress = served_plain
    r = client.post("/v1/generate", json={"prompt": "a cat", "style_image": STYLE})
    assert r.status_code == 422
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("style_image_unsupported", "style_image")
    assert _plans(ingress) == []


@pytest.mark.parametrize("ip_adapter", [True, False])
def test_models_say_whether_they_take_a_style_image(tmp_path, cache_dir, monkeypatch, ip_adapter):
    model = {"ip_adapter": {"uri": "builtin"}} if ip_adapter else {}
    client, _ = make_ingress(app_config(tmp_path, cache_dir, model=model), monkeypatch)
    (entry,) = client.get("/v1/models").json()["data"]
    assert entry["style_image"] is ip_adapter


def test_openai_generations_take_a_style_image(served):
    """``/v1/images/generations`` carries lorafleet's ``style_image`` / ``style_scale`` (the official client sends
    them in ``extra_body``) into the plan; a bad scale is OpenAI's error shape naming the param."""
    client, ingress = served
    body = {"prompt": "a cat", "size": "64x64", "response_format": "b64_json"}
    r = client.post("/v1/images/generations", json={**body, "style_image": STYLE, "style_scale": 9})
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_value", "style_scale")
    assert _plans(ingress) == []
    r = client.post("/v1/images/generations", json={**body, "style_image": STYLE, "style_scale": 0.5})
    assert r.status_code == 200, r.text
    (plan,) = _plans(ingress)
    assert np.array_equal(plan.style_image.pixels, picture()) and plan.style_scale == 0.5
