"""Prompt syntax end to end over HTTP: long prompts in 77-token chunks, (word:1.3) weighting, and
<lora:name:weight> tags that act exactly like the body's ``loras``."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from test_e2e_adapters import generate, pixels, register

from lora_helpers import UNET_ATTN, make_peft_lora_file

pytestmark = pytest.mark.e2e
SMALL = {"width": 64, "height": 64, "steps": 5, "scheduler": "ddim"}
WORDS = ["cat", "dog", "house", "tree"] * 30  # one CLIP token each: 120 tokens


@pytest.fixture(scope="module")
def adapter(cluster, tiny, tmp_path_factory):
    """A UNet + text-encoder adapter registered under a name of this module's own."""
    path = make_peft_lora_file(
        tiny,
        tmp_path_factory.mktemp("prompt-loras"),
        seed=31,
        rank=4,
        alpha=4,
        unet_targets=[*UNET_ATTN, "ff.net.2"],
        text_targets=["q_proj", "v_proj"],
    )
    r = register(cluster, path, "prompt-ink")
    assert r.status_code == 201, r.text
    return r.json()["name"]


def image(cluster, body) -> np.ndarray:
    r = generate(cluster, {**SMALL, **body})
    assert r.status_code == 200, r.text
    return pixels(r.json()["images"][0]["b64"]).astype(int)


def test_long_prompt_is_served_and_its_second_chunk_counts(cluster):
    long = image(cluster, {"prompt": " ".join(WORDS), "seed": 3})
    assert long.shape == (64, 64, 3) and long.std() > 5
    first_75 = image(cluster, {"prompt": " ".join(WORDS[:75]), "seed": 3})
    assert np.abs(long - first_75).max() > 0  # not truncated to CLIP's 77 tokens


def test_negative_prompt_longer_than_the_prompt(cluster):
    # CFG stacks (negative, positive): the short one is padded with empty chunks to the same length.
    out = image(cluster, {"prompt": "a cat", "negative_prompt": " ".join(WORDS), "seed": 4})
    plain = image(cluster, {"prompt": "a cat", "seed": 4})
    assert np.abs(out - plain).max() > 0


def test_over_long_prompt_is_422_prompt_too_long(cluster):
    r = generate(cluster, {**SMALL, "prompt": "cat " * 226})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("prompt_too_long", "prompt")
    assert "226 tokens" in error["message"] and "225 tokens" in error["message"]
    assert generate(cluster, {**SMALL, "prompt": "cat " * 225, "seed": 1}).status_code == 200


def test_weighting_changes_the_image_and_weight_one_does_not(cluster):
    plain = image(cluster, {"prompt": "a cat on a mat", "seed": 5})
    heavy = image(cluster, {"prompt": "a (cat:1.5) on a mat", "seed": 5})
    one = image(cluster, {"prompt": "a (cat:1.0) on a mat", "seed": 5})
    assert np.array_equal(one, plain)
    assert np.abs(heavy - plain).max() > 2


def test_lora_tag_equals_body_loras(cluster, adapter):
    by_body = generate(
        cluster, {**SMALL, "prompt": "a harbour", "seed": 21, "loras": [{"name": adapter, "scale": 0.8}]}
    )
    by_tag = generate(cluster, {**SMALL, "prompt": f"a harbour <lora:{adapter}:0.8>", "seed": 21})
    assert by_body.status_code == by_tag.status_code == 200, by_tag.text
    assert by_tag.json()["loras"] == [{"ref": f"{adapter}@1", "scale": 0.8}]
    tagged = pixels(by_tag.json()["images"][0]["b64"]).astype(int)
    assert np.array_equal(tagged, pixels(by_body.json()["images"][0]["b64"]).astype(int))
    base = image(cluster, {"prompt": "a harbour", "seed": 21})
    assert np.abs(tagged - base).max() > 20  # the adapter really applies


def test_lora_tag_works_on_the_openai_endpoint(cluster, adapter):
    r = requests.post(
        cluster.url + "/v1/images/generations",
        json={
            "prompt": f"<lora:{adapter}@1:0.8>a harbour",
            "size": "64x64",
            "steps": 5,
            "seed": 21,
            "scheduler": "ddim",
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    native = image(cluster, {"prompt": "a harbour", "seed": 21, "loras": [{"name": adapter, "scale": 0.8}]})
    assert np.array_equal(pixels(r.json()["data"][0]["b64_json"]).astype(int), native)


def test_unknown_or_malformed_lora_tag_is_an_error_on_prompt(cluster, adapter):
    r = generate(cluster, {**SMALL, "prompt": "a harbour <lora:missing:1>"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("adapter_not_found", "prompt") and "missing" in error["message"]
    r = generate(cluster, {**SMALL, "prompt": f"a harbour <lora:{adapter}:lots>"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_value", "prompt") and "lots" in error["message"]


def test_a1111_prompt_editing_alternation_and_and(cluster):
    """[from:to:when], [a|b] and AND go through the TextEncoder's schedule to the Denoiser's rows."""
    plain = image(cluster, {"prompt": "a cat", "seed": 6})
    # An edit between equal texts takes the schedule path (two entries, one row) and must equal the plain image.
    same = image(cluster, {"prompt": "[a cat:a cat:0.5]", "seed": 6})
    assert np.array_equal(same, plain)
    edited = image(cluster, {"prompt": "[a cat:a dog:0.5]", "seed": 6})
    dog = image(cluster, {"prompt": "a dog", "seed": 6})
    assert np.abs(edited - plain).max() > 0 and np.abs(edited - dog).max() > 0
    assert image(cluster, {"prompt": "a [cat|dog]", "seed": 6}).std() > 5
    # AND with weights 1.0 and 0.0 is the first part alone, computed in two parts' rows
    assert np.array_equal(image(cluster, {"prompt": "a cat :1 AND a dog :0", "seed": 6}), plain)
    both = image(cluster, {"prompt": "a cat AND a dog :0.8", "seed": 6})
    assert np.abs(both - plain).max() > 0
    # malformed syntax is text; too many AND parts is a 422 naming prompt and the limit
    assert image(cluster, {"prompt": "a [cat:dog", "seed": 6}).shape == (64, 64, 3)
    r = generate(cluster, {**SMALL, "prompt": " AND ".join(["cat"] * 9)})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["field"], error["code"]) == ("prompt", "invalid_value")
    assert "limits.max_prompt_and_parts" in error["message"] and "8" in error["message"]
