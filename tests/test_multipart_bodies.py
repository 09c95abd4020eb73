"""The native generation routes take multipart/form-data (graph/multipart_bodies.py): a ``request`` field with the
JSON body and files ``image``, ``mask``, ``style_image``, over the in-process HTTP app (the real middleware stack
and planner; a fake graph behind them)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from image_helpers import png_b64
from ingress_helpers import app_config, is_error_shape, make_ingress

BODY = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}


def png_bytes(array: np.ndarray) -> bytes:
    return base64.b64decode(png_b64(array))


def picture(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def served(tmp_path, cache_dir, monkeypatch):
    return make_ingress(app_config(tmp_path, cache_dir, model={"ip_adapter": {"uri": "builtin"}}), monkeypatch)


def _plans(ingress) -> list:
    return ingress.graph.inner.plans


def test_a_style_image_as_a_file_part(served):
    client, ingress = served
    style = picture(1)
    r = client.post(
        "/v1/generate",
        data={"request": json.dumps({**BODY, "style_scale": 0.5})},
        files={"style_image": ("ref.png", png_bytes(style), "image/png")},
    )
    assert r.status_code == 200, r.text
    (plan,) = _plans(ingress)
    assert np.array_equal(plan.style_image.pixels, style) and plan.style_scale == 0.5 and plan.prompt == "a lighthouse"


def test_img2img_and_inpainting_files_and_a_job(served):
    client, ingress = served
    image, style = picture(2, 64, 64), picture(3)
    mask = np.full((64, 64), 255, np.uint8)
    r = client.post(
        "/v1/img2img",
        data={"request": json.dumps({**BODY, "strength": 0.5})},
        files={"image": ("in.png", png_bytes(image)), "style_image": ("ref.png", png_bytes(style))},
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/inpaint",
        data={"request": json.dumps(BODY)},
        files={"image": ("in.png", png_bytes(image)), "mask": ("m.png", png_bytes(mask))},
    )
    assert r.status_code == 200, r.text
    img2img, inpaint = _plans(ingress)
    assert img2img.mode == "img2img" and np.array_equal(img2img.style_image.pixels, style)
    assert inpaint.mode == "inpaint" and inpaint.style_image is None
    r = client.post("/v1/jobs", data={"request": json.dumps(BODY)}, files={"style_image": ("r.png", png_bytes(style))})
    assert r.status_code == 202, r.text
    (job,) = ingress.jobs.submitted
    assert np.array_equal(job.style_image.pixels, style)


@pytest.mark.parametrize(
    ("data", "files", "field", "message"),
    [
        ({}, {"style_image": ("r.png", b"x")}, "request", "a multipart body needs a 'request' field"),
        ({"request": "{not json"}, {}, "request", "request is not JSON"),
        ({"request": "[1, 2]"}, {}, "request", "request must be a JSON object"),
        (
            {"request": json.dumps({**BODY, "style_image": "eA=="})},
            {"style_image": ("r.png", b"x")},
            "style_image",
            "style_image is given twice",
        ),
        ({"request": json.dumps(BODY), "seed": "3"}, {}, "seed", "seed is not a part of this form"),
        (
            {"request": json.dumps({**BODY, "style_scale": 0.5})},
            {"style_image": ("r.png", b"not an image")},
            "style_image",
            None,
        ),  # the planner's own check of the decoded file
    ],
)
def test_a_bad_form_is_a_422_naming_the_field_and_queues_nothing(served, data, files, field, message):
    client, ingress = served
    parts = {**{k: (None, v) for k, v in data.items()}, **files}  # text fields as parts: always multipart
    r = client.post("/v1/generate", files=parts)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert is_error_shape(r.json()) and err["field"] == field
    if message is not None:
        assert err["message"].startswith(message), err["message"]
    assert _plans(ingress) == []


def test_a_form_past_the_body_cap_is_a_413(tmp_path, cache_dir, monkeypatch):
    config = app_config(tmp_path, cache_dir, limits={"max_image_body_bytes": 1_300_000, "max_image_bytes": 300_000})
    client, ingress = make_ingress(config, monkeypatch)
    r = client.post("/v1/img2img", data={"request": json.dumps(BODY)}, files={"image": ("big.png", b"\0" * 1_400_000)})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large" and _plans(ingress) == []
