"""The OpenAI Images API end to end with the official ``openai`` client, through Ray Serve and real HTTP:
``images.generate`` with today's fields, streamed (partial images, then the image), ``images.edit`` with and
without a mask (equal to the native img2img / inpainting answers), ``response_format="url"`` and fetching the
URL (and, from an app under a route prefix with ``openai.image_url_ttl_s: 0``, an expired one), and errors
as the client exposes them (``param``, ``type``, ``code``)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from deployments.engine.images import encode_image

from conftest import wait_until

pytestmark = pytest.mark.e2e

FAST = {"steps": 4, "seed": 3}
TTL0_APP, TTL0_PREFIX = "lorafleet-openai-ttl0", "/openai-ttl0"


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def native(cluster, path: str, body: dict) -> list[bytes]:
    r = requests.post(cluster.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return [base64.b64decode(im["b64"]) for im in r.json()["images"]]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_generate_with_todays_fields(cluster):
    client = client_for(cluster.url)
    result = client.images.generate(
        model="tiny-sd",
        prompt="a lighthouse",
        n=2,
        size="64x64",
        background="opaque",
        moderation="low",
        quality="high",
        style="vivid",
        output_format="jpeg",
        output_compression=80,
        user="tenant-a",
        safety_identifier="hashed-user",
        extra_body=FAST,
    )
    assert (result.background, result.output_format, result.size, len(result.data)) == ("opaque", "jpeg", "64x64", 2)
    body = {"prompt": "a lighthouse", "num_images": 2, "width": 64, "height": 64, **FAST}
    same = native(cluster, "/v1/generate", body)
    for item, reference in zip(result.data, same, strict=True):
        jpeg = base64.b64decode(item.b64_json)
        assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
        assert jpeg == encode_image(pixels(reference).astype(np.uint8), "jpeg", quality=80)  # the same image at 80
    auto = client.images.generate(prompt="a lighthouse", size="auto", extra_body=FAST)
    assert auto.size == "256x256" and Image.open(io.BytesIO(base64.b64decode(auto.data[0].b64_json))).size == (256, 256)


def test_a_streamed_generation_sends_partial_images_then_the_image(cluster):
    client = client_for(cluster.url)
    body = {"prompt": "a red kite", "size": "64x64", "extra_body": {"steps": 9, "seed": 8}}
    events = list(client.images.generate(stream=True, partial_images=2, **body))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "64x64" and e.output_format == "png" for e in events)
    partial = Image.open(io.BytesIO(base64.b64decode(events[0].b64_json)))
    assert (partial.format, partial.size) == ("PNG", (64, 64))
    whole = client.images.generate(**body)
    assert events[-1].b64_json == whole.data[0].b64_json  # the same image as unstreamed, byte for byte


def test_edit_without_a_mask_is_img2img_and_with_one_inpainting(cluster):
    client = client_for(cluster.url)
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image = png(source)
    edited = client.images.edit(image=("in.png", image, "image/png"), prompt="a cat", n=2, extra_body=FAST)
    b64 = base64.b64encode(image).decode()
    same = native(cluster, "/v1/img2img", {"prompt": "a cat", "image": b64, "num_images": 2, **FAST})
    assert [base64.b64decode(d.b64_json) for d in edited.data] == same  # strength 0.75, as /v1/img2img

    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[16:48, 8:40] = 0  # OpenAI's mask: transparent = edit here
    mask = png(Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), mode="RGBA"))
    inpainted = client.images.edit(
        image=("in.png", image, "image/png"), mask=("m.png", mask, "image/png"), prompt="a cat", extra_body=FAST
    )
    white = png(Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8)).convert("RGB"))
    same = native(
        cluster,
        "/v1/inpaint",
        {"prompt": "a cat", "image": b64, "mask": base64.b64encode(white).decode(), **FAST},
    )
    out = base64.b64decode(inpainted.data[0].b64_json)
    assert out == same[0]
    kept = np.ones((64, 64), dtype=bool)
    kept[16:48, 8:40] = False
    assert np.array_equal(pixels(out)[kept], np.asarray(source).astype(int)[kept])  # unmasked pixels come back


def test_url_responses_serve_the_image(cluster):
    client = client_for(cluster.url)
    body = {"prompt": "a harbour", "n": 2, "size": "64x64", "output_format": "webp", "extra_body": FAST}
    by_url = client.images.generate(response_format="url", **body)
    inline = client.images.generate(response_format="b64_json", **body)
    for item, reference in zip(by_url.data, inline.data, strict=True):
        assert item.b64_json is None and item.url.startswith(cluster.url + "/v1/images/files/")
        r = requests.get(item.url, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
        assert r.content == base64.b64decode(reference.b64_json)
    unknown = requests.get(cluster.url + "/v1/images/files/not-a-file/0.webp", timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "image_not_found"


def test_errors_carry_param_type_and_code(cluster):
    client = client_for(cluster.url)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", n=9, size="64x64")
    assert (e.value.param, e.value.type, e.value.code) == ("n", "invalid_request_error", "invalid_value")
    assert e.value.message.startswith("Error code: 422") and "n must be in [1, 8], got 9" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", size="64x64", background="transparent")
    assert (e.value.param, e.value.code) == ("background", "unsupported_value")
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="x", model="sdxl", size="64x64")
    assert (e.value.param, e.value.type, e.value.code) == ("model", "invalid_request_error", "model_not_found")
    opaque = png(Image.new("RGB", (64, 64)))
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=("in.png", opaque, "image/png"), mask=("m.png", opaque, "image/png"), prompt="x")
    assert (e.value.param, e.value.code) == ("mask", "invalid_image") and "alpha channel" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=[("a.png", opaque, "image/png"), ("b.png", opaque, "image/png")], prompt="x")
    assert e.value.param == "image" and "one file per edit, got 2" in e.value.message


@pytest.fixture(scope="module")
def ttl0(cluster, cache_dir, tmp_path_factory):
    """A second app under a route prefix whose image URLs expire at once (``openai.image_url_ttl_s: 0``)."""
    from ray import serve

    from graph.app import build_app

    root = tmp_path_factory.mktemp("openai-ttl0")
    one = {"autoscaling": None, "num_replicas": 1}
    config = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
        "text_encoder": one,
        "denoiser": {**one, "max_rows_per_tick": 8},
        "vae": one,
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "jobs": {"durable": False},
        "openai": {"image_url_ttl_s": 0},
    }
    serve.run(build_app(config), name=TTL0_APP, route_prefix=TTL0_PREFIX)
    url = cluster.url + TTL0_PREFIX

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the ttl-0 app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield url
    finally:
        serve.delete(TTL0_APP)


def test_an_expired_url_is_a_404_saying_so_under_a_route_prefix(ttl0):
    result = client_for(ttl0).images.generate(prompt="a harbour", size="64x64", response_format="url", extra_body=FAST)
    url = result.data[0].url
    assert url.startswith(ttl0 + "/v1/images/files/") and url.split("?")[0].endswith("/0.png")
    r = requests.get(url, timeout=60)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("image_expired", "invalid_request_error", None)
    assert "this image URL expired at" in error["message"] and "openai.image_url_ttl_s" in error["message"]
    r = requests.get(url.split("?")[0], timeout=60)  # without its expiry: the store no longer has it either
    assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"


# -- IP-Adapter (#22): an edit's style reference, lorafleet's extension fields --------------------------------


@pytest.fixture(scope="module")
def styled(cluster, cache_dir, tmp_path_factory):
    """An app served with its builtin IP-Adapter under a route prefix (tests/style_app.py)."""
    from style_app import deployed

    with deployed(cluster, cache_dir, tmp_path_factory) as url:
        yield url


def test_an_edit_with_a_style_image_equals_the_native_img2img_with_it(styled):
    client = client_for(styled)
    source = png(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    y, x = np.mgrid[0:40, 0:40]
    style = png(Image.fromarray(np.stack([x * 6, y * 6, 255 - x * 3], axis=-1).astype(np.uint8)))
    style_b64 = base64.b64encode(style).decode()
    edited = client.images.edit(
        image=("in.png", source, "image/png"),
        prompt="a cat",
        extra_body={"style_image": "data:image/png;base64," + style_b64, "style_scale": 0.7, **FAST},
    )
    styled_cluster = SimpleNamespace(url=styled)  # native() posts to <url><path>
    body = {"prompt": "a cat", "image": base64.b64encode(source).decode(), **FAST}
    same = native(styled_cluster, "/v1/img2img", {**body, "style_image": style_b64, "style_scale": 0.7})
    assert [base64.b64decode(d.b64_json) for d in edited.data] == same
    assert same != native(styled_cluster, "/v1/img2img", body)  # the style image moved pixels
    as_file = requests.post(  # a plain multipart client sends the style as a file part
        styled + "/v1/images/edits",
        files={"image": ("in.png", source, "image/png"), "style_image": ("s.png", style, "image/png")},
        data={"prompt": "a cat", "style_scale": "0.7", **{k: str(v) for k, v in FAST.items()}},
        timeout=300,
    )
    assert as_file.status_code == 200, as_file.text
    assert base64.b64decode(as_file.json()["data"][0]["b64_json"]) == same[0]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(
            image=("in.png", source, "image/png"),
            prompt="a cat",
            extra_body={"style_image": style_b64, "style_scale": 3, **FAST},
        )
    assert (e.value.param, e.value.code) == ("style_scale", "invalid_value") and "[0, 2.0]" in e.value.message
