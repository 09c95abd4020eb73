"""End to end through real HTTP: Ray Serve's proxy, the ingress, TextEncoder -> Denoiser -> VAE."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import HeldDenoiser, assert_clean_error

pytestmark = pytest.mark.e2e

SMALL = {"width": 64, "height": 64, "steps": 6}


def post(cluster, body, path="/v1/generate", **kw):
    return requests.post(cluster.url + path, json=body, timeout=300, **kw)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def b64_pixels(item) -> np.ndarray:
    return pixels(base64.b64decode(item))


def test_generate_returns_images_seeds_and_timings(cluster):
    r = post(cluster, {"prompt": "a red boat", "num_images": 2, "seed": 41, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-sd"
    assert [im["seed"] for im in body["images"]] == [41, 42]
    assert all((im["width"], im["height"]) == (64, 64) for im in body["images"])
    a, b = (b64_pixels(im["b64"]) for im in body["images"])
    assert a.shape == (64, 64, 3) and np.abs(a.astype(int) - b).max() > 10
    timings = body["timings"]
    assert set(timings) == {
        "queue_ms", "encode_ms", "denoise_ms", "decode_ms", "encode_wait_ms", "decode_wait_ms", "step_ms"
    }  # fmt: skip
    assert 0 < timings["step_ms"] <= timings["denoise_ms"]
    assert timings["denoise_ms"] > 0 and timings["decode_ms"] > 0 and timings["encode_ms"] > 0
    assert timings["queue_ms"] >= 0 and timings["decode_wait_ms"] >= 0
    assert 0 <= timings["encode_wait_ms"] <= timings["encode_ms"]


def test_seed_is_chosen_and_returned_when_absent(cluster):
    body = post(cluster, {"prompt": "a tree", **SMALL}).json()
    seed = body["images"][0]["seed"]
    again = post(cluster, {"prompt": "a tree", "seed": seed, **SMALL}).json()
    assert again["images"][0]["b64"] == body["images"][0]["b64"]


def test_raw_image_with_accept_header(cluster):
    for mime, fmt in (("image/png", "PNG"), ("image/webp", "WEBP"), ("image/jpeg", "JPEG")):
        r = post(cluster, {"prompt": "a cat", "seed": 1, **SMALL}, headers={"Accept": mime})
        assert r.status_code == 200
        assert r.headers["content-type"] == mime
        assert r.headers["x-seed"] == "1"
        assert Image.open(io.BytesIO(r.content)).format == fmt


def test_same_request_is_byte_identical(cluster):
    body = {"prompt": "a lighthouse", "seed": 7, "scheduler": "euler_a", **SMALL}
    assert post(cluster, body).json()["images"] == post(cluster, body).json()["images"]


def run_alone(cluster, post_body) -> tuple[np.ndarray, int, int]:
    """One request with nothing else on the Denoiser: its image, and the UNet forwards (ticks) and rows it took."""
    from conftest import wait_until

    # Whatever an earlier test left (a cancelled job's last tick) must not count as this request's.
    before = wait_until(
        lambda: (s := cluster.stats("Denoiser"))["active"] == 0 and s["waiting"] == 0 and s, "an idle Denoiser"
    )
    r = post_body()
    assert r.status_code == 200, r.text
    after = cluster.stats("Denoiser")
    image = b64_pixels(r.json()["images"][0]["b64"])
    return image, after["ticks"] - before["ticks"], after["rows"] - before["rows"]


def test_batching_does_not_change_the_image(cluster):
    target = {"prompt": "a lighthouse at dusk", "seed": 5, "scheduler": "dpmpp_2m", **SMALL}
    others = [
        {"prompt": f"noise {i}", "seed": 100 + i, "steps": 4 + i, "width": 64, "height": 64, "scheduler": s}
        for i, s in enumerate(["default", "ddim", "euler", "euler_a", "dpmpp_2m"])
    ]
    bodies = [*others, target, *others]
    alone = {b["prompt"]: run_alone(cluster, lambda b=b: post(cluster, b)) for b in [*others, target]}
    # Eight at a time wait behind a held batch, then go together: concurrent by construction, at any speed.
    with ThreadPoolExecutor(8) as pool, HeldDenoiser(cluster) as held:
        futures = [pool.submit(post, cluster, b) for b in bodies]
        held.wait_waiting(8)
        held.release()
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results)
    after = cluster.stats("Denoiser")
    # Batched for real: fewer UNet forwards than the same requests one at a time.
    one_at_a_time = sum(alone[b["prompt"]][1] for b in bodies)
    assert held.ticks_besides(after, rows_besides=sum(alone[b["prompt"]][2] for b in bodies)) < one_at_a_time
    for body, r in zip(bodies, results, strict=True):  # the target, and every other one too
        assert np.array_equal(b64_pixels(r.json()["images"][0]["b64"]), alone[body["prompt"]][0]), body


def test_server_image_equals_diffusers_pipeline(cluster, tiny):
    from deployments.engine.images import to_uint8

    from engine_helpers import Engine

    body = {"prompt": "a watercolor fox", "negative_prompt": "blurry", "seed": 9, "scheduler": "ddim", **SMALL}
    served = b64_pixels(post(cluster, body).json()["images"][0]["b64"])
    ref = Engine(tiny).reference("a watercolor fox", "blurry", steps=6, seed=9, scheduler="ddim")
    assert np.abs(served.astype(int) - to_uint8(ref)[0]).max() <= 1


def test_openai_client(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="not-needed")
    result = client.images.generate(
        model="tiny-sd",
        prompt="a lighthouse",
        n=2,
        size="64x64",
        response_format="b64_json",
        user="tenant-a",
        extra_body={"steps": 4, "seed": 3, "negative_prompt": "fog"},
    )
    assert len(result.data) == 2 and result.created > 0
    native = post(
        cluster,
        {
            "prompt": "a lighthouse",
            "negative_prompt": "fog",
            "seed": 3,
            "steps": 4,
            "width": 64,
            "height": 64,
            "num_images": 2,
        },
    ).json()
    assert [d.b64_json for d in result.data] == [im["b64"] for im in native["images"]]
    with pytest.raises(openai.UnprocessableEntityError, match="transparent"):
        client.images.generate(model="tiny-sd", prompt="x", size="64x64", background="transparent")
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.images.generate(model="sdxl", prompt="x", size="64x64", response_format="b64_json")
    assert [m.id for m in client.models.list()] == ["tiny-sd"]


def test_health_ready_models_openapi(cluster):
    assert requests.get(cluster.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(cluster.url + "/readyz", timeout=30).json()
    assert ready["deployments"] == {"TextEncoder": "ready", "Denoiser": "ready", "VAE": "ready"}
    models = requests.get(cluster.url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "tiny-sd" and models["data"][0]["default_size"] == "256x256"
    spec = requests.get(cluster.url + "/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/images/generations", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])


BAD = [
    # body (or raw text), status, code, field
    ('{"prompt": "x",', 400, "invalid_json", None),
    ("[1, 2]", 400, "invalid_body", None),
    ({}, 422, "missing_field", "prompt"),
    ({"prompt": ""}, 422, "invalid_value", "prompt"),
    ({"prompt": "   "}, 422, "invalid_value", "prompt"),
    ({"prompt": "x", "width": 100}, 422, "invalid_value", "width"),
    ({"prompt": "x", "height": 56}, 422, "invalid_value", "height"),
    ({"prompt": "x", "width": 2048}, 422, "invalid_value", "width"),
    ({"prompt": "x", "width": "64"}, 422, "invalid_value", "width"),
    ({"prompt": "x", "steps": 0}, 422, "invalid_value", "steps"),
    ({"prompt": "x", "steps": 151}, 422, "invalid_value", "steps"),
    ({"prompt": "x", "guidance_scale": 31}, 422, "invalid_value", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "invalid_value", "guidance_scale"),
    ({"prompt": "x", "num_images": 0}, 422, "invalid_value", "num_images"),
    ({"prompt": "x", "num_images": 9}, 422, "invalid_value", "num_images"),
    ({"prompt": "cat " * 226}, 422, "prompt_too_long", "prompt"),
    ({"prompt": "x", "negative_prompt": "dog " * 226}, 422, "prompt_too_long", "negative_prompt"),
    ({"prompt": "x", "scheduler": "dpm_fast"}, 422, "invalid_value", "scheduler"),
    ({"prompt": "x", "model": "sdxl"}, 404, "model_not_found", "model"),
    ({"prompt": "x", "seed": -1}, 422, "invalid_value", "seed"),
    ({"prompt": "x", "output_format": "gif"}, 422, "invalid_value", "output_format"),
    ({"prompt": "x", "colour": "red"}, 422, "unknown_field", "colour"),
    ({"prompt": 5}, 422, "invalid_value", "prompt"),
]


@pytest.mark.parametrize("body, status, code, field", BAD)
def test_bad_input_is_a_clear_4xx_and_never_reaches_the_denoiser(cluster, body, status, code, field):
    before = cluster.stats("Denoiser")
    if isinstance(body, str):
        r = requests.post(
            cluster.url + "/v1/generate", data=body, timeout=30, headers={"Content-Type": "application/json"}
        )
    else:
        r = post(cluster, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["field"] == field
    assert error["message"]
    assert cluster.stats("Denoiser")["ticks"] == before["ticks"]


def test_prompt_limit_is_stated(cluster):
    error = post(cluster, {"prompt": "cat " * 226}).json()["error"]
    assert "226 tokens" in error["message"] and "limit is 225" in error["message"]


def test_openai_bad_size_names_the_field(cluster):
    r = post(cluster, {"prompt": "x", "size": "big"}, path="/v1/images/generations")
    assert r.status_code == 422 and r.json()["error"]["param"] == "size"  # OpenAI's error shape
    r = post(cluster, {"prompt": "x", "size": "64x60"}, path="/v1/images/generations")
    assert r.status_code == 422 and r.json()["error"]["param"] == "size"
    r = post(cluster, {"prompt": "x", "n": 9}, path="/v1/images/generations")
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"


def test_overload_answers_503_with_retry_after_and_recovers(cluster):
    body = {"prompt": "crowd", "num_images": 4, "steps": 40, "width": 64, "height": 64}
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: post(cluster, {**body, "seed": i}), range(12)))
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) == {200, 503}, statuses
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            assert_clean_error(r.text)  # D1: no Ray traceback in an overload answer
    stats = cluster.stats("Denoiser")
    assert stats["waiting"] == 0 and stats["active"] == 0  # no stuck slots
    assert post(cluster, {"prompt": "after the storm", **SMALL}).status_code == 200
