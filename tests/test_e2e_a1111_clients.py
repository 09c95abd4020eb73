"""A1111's API with the clients people use, against the app on Ray Serve over real HTTP: the ``webuiapi``
package from PyPI (options, current model, progress, interrupt, skip, listings, txt2img) and a recorded
Open WebUI call sequence (``fixtures/open_webui_a1111.json``) replayed as Open WebUI sends it.

Concurrency is controlled by the server's own states (``HeldDenoiser`` keeps the batch full, so the
generations under test wait where the test can see them), never by sleeps."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from conftest import HeldDenoiser, wait_until

pytestmark = pytest.mark.e2e
SMALL = {"width": 64, "height": 64, "steps": 3}
FIXTURE = Path(__file__).parent / "fixtures" / "open_webui_a1111.json"


def client(cluster, key: str | None = None, basic: tuple[str, str] | None = None) -> webuiapi.WebUIApi:
    """The real client; ``key``: an API key (Bearer), ``basic``: A1111's --api-auth credentials."""
    if basic is not None:
        return webuiapi.WebUIApi(baseurl=cluster.url + "/sdapi/v1", username=basic[0], password=basic[1])
    api = webuiapi.WebUIApi(baseurl=cluster.url + "/sdapi/v1")
    if key is not None:
        api.session.headers["Authorization"] = f"Bearer {key}"
    return api


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_options_current_model_and_set_options_are_per_caller(cluster):
    alice, bob = client(cluster, key="alice"), client(cluster, basic=("bob", "pw"))
    (model,) = alice.get_sd_models()
    options = alice.get_options()
    assert options["sd_model_checkpoint"] == model["title"] and options["sd_checkpoint_hash"] == model["sha256"]
    assert alice.util_get_current_model() == model["title"]
    # The client's fallback when sd_model_checkpoint is missing: the sd-models entry whose sha256 is the hash.
    assert [m["title"] for m in alice.get_sd_models() if m["sha256"] == options["sd_checkpoint_hash"]] == [
        model["title"]
    ]
    alice.util_set_model("tiny-sd")  # webuiapi finds the closest title and posts it
    assert alice.util_get_current_model() == model["title"]

    answer = alice.set_options({"samples_format": "jpg", "jpeg_quality": 95})
    assert answer == {"applied": ["samples_format"], "ignored": ["jpeg_quality"]}
    assert alice.get_options()["samples_format"] == "jpg"
    assert bob.get_options()["samples_format"] == "png"  # bob's own options: untouched
    mine = alice.txt2img(prompt="a red boat", seed=4, sampler_name="Euler", **SMALL)
    theirs = bob.txt2img(prompt="a red boat", seed=4, sampler_name="Euler", **SMALL)
    assert (mine.image.format, theirs.image.format) == ("JPEG", "PNG")
    assert alice.set_options({"samples_format": "png"})["applied"] == ["samples_format"]

    bad = alice.session.post(alice.baseurl + "/options", json={"CLIP_stop_at_last_layers": 2})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "CLIP_stop_at_last_layers"


def test_listings_through_the_client(cluster):
    api = client(cluster)
    from deployments.engine.schedulers import SCHEDULES

    assert api.util_get_scheduler_names() == sorted(["automatic", *SCHEDULES])
    assert api.get_schedulers()[0]["label"] == "Automatic"
    assert api.get_cmd_flags()["api"] is True
    assert api.get_sd_vae() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    memory = api.get_memory()
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] and memory["cuda"] == {"error": "unavailable"}
    progress = api.get_progress()
    assert (progress["progress"], progress["state"]["job_count"]) == (0.0, 0)
    api.util_wait_for_ready()  # returns at once: nothing of this caller's is in flight


def test_txt2img_euler_equals_the_native_api(cluster):
    api = client(cluster)
    result = api.txt2img(prompt="a red boat", seed=5, sampler_name="Euler", cfg_scale=7.5, **SMALL)
    assert result.info["sampler_name"] == "Euler" and result.info["all_seeds"] == [5]
    assert result.info["stopped"] is None and result.image.size == (64, 64)
    native = requests.post(
        cluster.url + "/v1/generate",
        json={"prompt": "a red boat", "seed": 5, "scheduler": "euler", "guidance_scale": 7.5, **SMALL},
        timeout=300,
    ).json()
    expected = Image.open(io.BytesIO(base64.b64decode(native["images"][0]["b64"])))
    assert np.array_equal(pixels(result.image), pixels(expected))


def progress_of(api) -> dict:
    return api.get_progress()


def test_interrupt_and_progress_are_the_callers_own(cluster):
    alice, bob = client(cluster, key="alice-2"), client(cluster, key="bob-2")
    body = {"prompt": "a quiet harbour", "sampler_name": "Euler", **SMALL}
    with HeldDenoiser(cluster) as held, ThreadPoolExecutor(2) as pool:
        mine = pool.submit(alice.txt2img, seed=1, **body)
        theirs = pool.submit(bob.txt2img, seed=2, **body)
        held.wait_waiting(2)  # both wait behind the held batch
        for api in (alice, bob):
            state = wait_until(lambda a=api: (p := progress_of(a))["state"]["job_count"] == 1 and p, "progress")
            assert state["state"]["sampling_steps"] == 3 and state["textinfo"].startswith("queued")
        assert client(cluster, key="carol").get_progress()["state"]["job_count"] == 0

        assert bob.interrupt() == {"interrupted": 1}
        stopped = theirs.result(timeout=300)
        assert (stopped.images, stopped.info["stopped"]) == ([], "interrupted")
        assert progress_of(alice)["state"]["job_count"] == 1  # alice's still waits, untouched
        held.release()
        done = mine.result(timeout=300)
    assert done.info["stopped"] is None and len(done.images) == 1 and done.image.size == (64, 64)


def test_skip_ends_the_callers_oldest_generation_only(cluster):
    api = client(cluster, key="dave")
    body = {"prompt": "a windmill", "sampler_name": "Euler", **SMALL}
    with HeldDenoiser(cluster) as held, ThreadPoolExecutor(2) as pool:
        first = pool.submit(api.txt2img, seed=1, **body)
        wait_until(lambda: progress_of(api)["state"]["job_count"] == 1, "the first generation")
        second = pool.submit(api.txt2img, seed=2, **body)
        held.wait_waiting(2)
        wait_until(lambda: progress_of(api)["state"]["job_count"] == 2, "the second generation")
        assert api.skip() == {"skipped": 1}
        assert first.result(timeout=300).info["stopped"] == "skipped"
        held.release()
        later = second.result(timeout=300)
    assert later.info["stopped"] is None and later.info["all_seeds"] == [2] and len(later.images) == 1


def test_progress_shows_a_preview_only_when_asked(cluster):
    api = client(cluster, key="erin")
    with ThreadPoolExecutor(1) as pool:
        body = {"prompt": "a field", "seed": 3, "sampler_name": "Euler", "steps": 150, "width": 64, "height": 64}
        running = pool.submit(api.txt2img, **body)

        def previewed():
            p = progress_of(api)
            assert not running.done(), "the generation ended before a preview was seen"
            return p["current_image"] is not None and p

        seen = wait_until(previewed, "a preview", interval_s=0.01)
        preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
        assert preview.format == "PNG" and preview.size == (8, 8)  # the latents' size: 64 / 8
        assert seen["state"]["sampling_step"] >= 5 and seen["state"]["sampling_steps"] == 150
        assert 0 < seen["progress"] < 1
        quiet = api.session.get(api.baseurl + "/progress", params={"skip_current_image": "true"}).json()
        assert quiet["current_image"] is None and quiet["state"]["job_count"] == 1
        assert api.interrupt() == {"interrupted": 1}
        assert running.result(timeout=300).info["stopped"] == "interrupted"


def _value(ref, saved: dict):
    """``$name`` / ``$name[0].key``: a value from an earlier answer."""
    if not isinstance(ref, str) or not ref.startswith("$"):
        return ref
    name, _, path = ref[1:].partition("[0].")
    return saved[name][0][path] if path else saved[name]


def test_open_webui_call_sequence(cluster):
    """Each recorded call, sent as Open WebUI sends it; each answer has what Open WebUI reads from it."""
    saved: dict = {}
    for call in json.loads(FIXTURE.read_text())["calls"]:
        body = call.get("json")
        if body is not None and "$merge" in body:
            body = {**_value(body["$merge"], saved), **{k: _value(v, saved) for k, v in body.items() if k != "$merge"}}
        url = cluster.url + call["path"]
        r = requests.request(call["method"], url, headers=call["headers"], json=body, timeout=300)
        assert r.status_code == call["status"], (call["why"], r.text)
        answer = r.json()
        for key in call.get("reads", []):
            assert key in answer, (call["why"], key)
        for entry in answer if "reads_each" in call else []:
            assert all(isinstance(entry[k], str) and entry[k] for k in call["reads_each"]), call["why"]
        for key, ref in call.get("equals", {}).items():
            assert answer[key] == _value(ref, saved), call["why"]
        if "images" in call:
            assert len(answer["images"]) == call["images"]
            image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))  # no data: prefix
            assert image.format == "PNG" and image.size == (64, 64)
            assert json.loads(answer["info"])["negative_prompt"] == "blurry"
        if "save" in call:
            saved[call["save"]] = answer
