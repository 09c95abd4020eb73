"""A1111's options, progress, interrupt/skip and listings: the translation (pure functions), the per-caller
state (fakes whose graph call is driven by events, no sleeps), and the real HTTP ingress in-process (no Ray).
The same against the app on Ray Serve with the real clients: ``test_e2e_a1111_clients.py``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest
from starlette.requests import Request

from deployments.messages import DecodedImages, Preview, Queued, Step
from graph.a1111_info import schedulers
from graph.a1111_options import CallerOptions, CallerSettings, Checkpoint, apply_options, caller_of, options
from graph.a1111_progress import A1111Work
from graph.errors import APIError

from ingress_helpers import is_error_shape, make_ingress

CPS = [Checkpoint("sd", "aaaaaaaaaa", "a" * 64), Checkpoint("xl", "bbbbbbbbbb", "b" * 64)]


def resolve(text: str) -> str | None:
    return {"sd": "sd", "xl": "xl", "xl [bbbbbbbbbb]": "xl"}.get(text)


def request_with(auth: str | None = None, host: str = "10.1.2.3") -> Request:
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    return Request({"type": "http", "headers": headers, "client": (host, 4321)})


# -- who is calling -------------------------------------------------------------------------------


def test_caller_is_the_api_key_then_basic_credentials_then_the_address():
    key = caller_of(request_with("Bearer k1"))
    assert key == "key:" + hashlib.sha256(b"k1").hexdigest()[:12]  # the fair-queuing tenant
    assert caller_of(request_with("Bearer k2")) != key
    basic = "Basic " + base64.b64encode(b"alice:pw").decode()
    assert caller_of(request_with(basic)) == "basic:" + hashlib.sha256(basic[6:].encode()).hexdigest()[:12]
    assert caller_of(request_with("")) == "addr:10.1.2.3"  # Open WebUI sends an empty header without auth
    assert caller_of(request_with("Bearer ", host="10.9.9.9")) == "addr:10.9.9.9"
    assert caller_of(request_with(None, host="10.9.9.9")) == "addr:10.9.9.9"


def test_caller_options_are_bounded_lru_and_expire():
    now = [0.0]
    held = CallerOptions(max_callers=2, ttl_s=10.0, clock=lambda: now[0])
    held.set("a", CallerSettings(model="xl"))
    held.set("b", CallerSettings(samples_format="jpg"))
    assert held.get("a").model == "xl"  # a is now the most recently used
    held.set("c", CallerSettings(model="sd"))
    assert len(held) == 2 and held.get("b") == CallerSettings()  # b, least recently used, went
    assert held.get("a").model == "xl" and held.get("c").model == "sd"
    now[0] = 9.0
    assert held.get("a").model == "xl"  # used at 9: lives until 19
    now[0] = 18.0
    assert held.get("c") == CallerSettings() and held.get("a").model == "xl"
    with pytest.raises(ValueError, match="max_callers"):
        CallerOptions(max_callers=0)


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, settings, applied, ignored",
    [
        ({"sd_model_checkpoint": "xl [bbbbbbbbbb]"}, CallerSettings(model="xl"), ["sd_model_checkpoint"], []),
        ({"samples_format": "JPG"}, CallerSettings(samples_format="jpg"), ["samples_format"], []),
        (
            {"samples_format": "webp", "jpeg_quality": 90},
            CallerSettings(samples_format="webp"),
            ["samples_format"],
            ["jpeg_quality"],
        ),  # fmt: skip
        (
            {"sd_vae": "None", "CLIP_stop_at_last_layers": 1},
            CallerSettings(),
            ["CLIP_stop_at_last_layers", "sd_vae"],
            [],
        ),  # fmt: skip
        # A whole options dict posted back, with the old hash beside the new checkpoint: the hash is read-only.
        (
            {**options(CallerSettings(), CPS[0], 5), "sd_model_checkpoint": "xl"},
            CallerSettings(model="xl"),
            ["CLIP_stop_at_last_layers", "samples_format", "sd_model_checkpoint", "sd_vae"],
            [
                "eta_noise_seed_delta",
                "grid_save",
                "live_previews_enable",
                "samples_save",
                "sd_checkpoint_hash",
                "sd_lora",
                "sd_unet",
                "show_progress_every_n_steps",
            ],
        ),  # fmt: skip
        ({}, CallerSettings(), [], []),
    ],
)
def test_apply_options(body, settings, applied, ignored):
    assert apply_options(body, CallerSettings(), CPS, resolve) == (settings, applied, ignored)


@pytest.mark.parametrize(
    "body, field, text",
    [
        ({"sd_model_checkpoint": "nope"}, "sd_model_checkpoint", "must name a served model ('sd [aaaaaaaaaa]', "),
        ({"sd_model_checkpoint": 3}, "sd_model_checkpoint", "got 3"),
        ({"samples_format": "gif"}, "samples_format", "must be one of ['png', 'jpg', 'jpeg', 'webp'], got 'gif'"),
        ({"samples_format": None}, "samples_format", "got None"),
        ({"sd_vae": "vae-ft-mse.safetensors"}, "sd_vae", "must be one of ['Automatic', 'None']"),
        ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers", "must be 1 (lorafleet has no CLIP skip), got 2"),
        ({"CLIP_stop_at_last_layers": True}, "CLIP_stop_at_last_layers", "got True"),
    ],
)
def test_a_bad_value_of_a_known_option_is_a_422_naming_it(body, field, text):
    with pytest.raises(APIError) as e:
        apply_options({"samples_format": "jpg", **body}, CallerSettings(), CPS, resolve)
    assert (e.value.status, e.value.code, e.value.field) == (422, "invalid_value", field)
    assert text in e.value.message and "\n" not in e.value.message


def test_options_name_the_callers_checkpoint_with_its_sd_models_hash():
    out = options(CallerSettings(model="xl", samples_format="jpg"), CPS[1], 5)
    assert out["sd_model_checkpoint"] == "xl [bbbbbbbbbb]" and out["sd_checkpoint_hash"] == "b" * 64
    assert (out["samples_format"], out["CLIP_stop_at_last_layers"], out["sd_vae"]) == ("jpg", 1, "Automatic")
    assert (out["live_previews_enable"], out["show_progress_every_n_steps"]) == (True, 5)
    assert options(CallerSettings(), CPS[0], 0)["live_previews_enable"] is False


def test_schedulers_are_a1111_entries_for_the_engines_schedules():
    from deployments.engine.schedulers import SCHEDULES

    out = {s["name"]: s for s in schedulers()}
    assert list(out) == ["automatic", *SCHEDULES]
    assert out["automatic"] == {
        "name": "automatic", "label": "Automatic", "aliases": [], "default_rho": -1.0, "need_inner_model": False
    }  # fmt: skip
    assert (out["karras"]["label"], out["karras"]["default_rho"]) == ("Karras", 7.0)
    assert (out["sgm_uniform"]["label"], out["sgm_uniform"]["aliases"]) == ("SGM Uniform", ["SGMUniform"])


# -- in-flight work: progress, interrupt, skip ----------------------------------------------------


class FakeRun:
    """A graph call that reports what the test feeds it and finishes when the test says."""

    def __init__(self, images: int = 1):
        self.on_event = None
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled = False
        self.images = images

    async def __call__(self, on_event):
        self.on_event = on_event
        self.started.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return DecodedImages(tuple(b"img%d" % k for k in range(self.images)), 0.0, 0.0, 0.0, 0.0)


def run_async(coro):
    return asyncio.run(coro)


def test_progress_is_idle_for_a_caller_without_work():
    out = A1111Work().progress("key:a", True)
    assert (out["progress"], out["eta_relative"], out["current_image"]) == (0.0, 0.0, None)
    assert out["state"]["job_count"] == 0 and out["state"]["sampling_steps"] == 0


def test_progress_follows_the_callers_own_generations():
    async def main():
        now = [100.0]
        work = A1111Work(clock=lambda: now[0])
        a1, a2, b = FakeRun(), FakeRun(), FakeRun()
        t1 = asyncio.ensure_future(work.run("key:a", "txt2img", 20, a1))
        await a1.started.wait()
        t2 = asyncio.ensure_future(work.run("key:a", "img2img", 10, a2))
        tb = asyncio.ensure_future(work.run("key:b", "txt2img", 30, b))
        await a2.started.wait()
        await b.started.wait()

        a1.on_event(Queued(position=3, eta_s=None))
        now[0] = 102.0  # no ETA from the Denoiser yet: A1111's estimate from the time so far (share done 1 %)
        out = work.progress("key:a", True)
        assert out["state"]["job_count"] == 2 and out["state"]["job"] == "scripts_txt2img"
        assert (out["progress"], out["eta_relative"]) == (0.0, pytest.approx(2.0 / 0.01 - 2.0))
        assert out["textinfo"] == "queued, 3 images ahead" and out["current_image"] is None

        a1.on_event(Step(step=5, steps=20, eta_s=3.0))
        a2.on_event(Step(step=10, steps=10, eta_s=0.5))
        a1.on_event(Preview(step=5, steps=20, image="data:image/png;base64,QUJD"))
        b.on_event(Step(step=29, steps=30, eta_s=0.1))
        out = work.progress("key:a", True)
        assert out["progress"] == pytest.approx(15 / 30) and out["eta_relative"] == 3.0
        assert (out["state"]["sampling_step"], out["state"]["sampling_steps"]) == (5, 20)  # the oldest: current
        assert out["current_image"] == "QUJD" and out["textinfo"] is None
        assert work.progress("key:a", False)["current_image"] is None  # skip_current_image=true
        assert work.progress("key:b", True)["state"]["sampling_step"] == 29  # b sees only b's

        for run in (a1, a2, b):
            run.finish.set()
        outcomes = await asyncio.gather(t1, t2, tb)
        assert [o.images for o in outcomes] == [[b"img0"]] * 3 and {o.stopped for o in outcomes} == {None}
        assert work.progress("key:a", True)["state"]["job_count"] == 0 and work.in_flight("key:b") == []

    run_async(main())


def test_interrupt_stops_only_the_callers_own_work():
    async def main():
        work = A1111Work()
        a, b1, b2 = FakeRun(images=2), FakeRun(), FakeRun()
        ta = asyncio.ensure_future(work.run("key:a", "txt2img", 5, a))
        tb1 = asyncio.ensure_future(work.run("key:b", "txt2img", 5, b1))
        tb2 = asyncio.ensure_future(work.run("key:b", "txt2img", 5, b2))
        await asyncio.gather(a.started.wait(), b1.started.wait(), b2.started.wait())

        assert work.interrupt("key:c") == 0  # a caller without work stops nothing
        assert work.interrupt("key:b") == 2
        assert work.interrupt("key:b") == 0  # already stopping: nothing more to stop
        b_outcomes = await asyncio.gather(tb1, tb2)
        assert [(o.images, o.stopped) for o in b_outcomes] == [([], "interrupted")] * 2
        assert b1.cancelled and b2.cancelled and not a.cancelled and not ta.done()
        a.finish.set()
        assert (await ta).images == [b"img0", b"img1"]

    run_async(main())


def test_skip_stops_the_callers_oldest_generation_only():
    async def main():
        work = A1111Work()
        first, second = FakeRun(), FakeRun()
        t1 = asyncio.ensure_future(work.run("key:a", "txt2img", 5, first))
        await first.started.wait()
        t2 = asyncio.ensure_future(work.run("key:a", "txt2img", 5, second))
        await second.started.wait()
        assert work.skip("key:a") == 1
        assert (await t1).stopped == "skipped" and not second.cancelled
        assert work.progress("key:a", False)["state"]["job_count"] == 1
        second.finish.set()
        assert (await t2).images == [b"img0"]
        assert work.skip("key:a") == 0

    run_async(main())


def test_a_route_cancelled_by_its_client_cancels_the_generation_and_is_not_an_interrupt():
    async def main():
        work = A1111Work()
        run = FakeRun()
        task = asyncio.ensure_future(work.run("key:a", "txt2img", 5, run))
        await run.started.wait()
        task.cancel()  # what Serve does when the HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert run.cancelled and work.in_flight("key:a") == []

    run_async(main())


# -- the HTTP routes, in-process ----------------------------------------------------------------------


@pytest.fixture
def served(tmp_path, cache_dir, tiny_dir, tiny_sdxl_dir, monkeypatch):
    from test_multi_model import two_models

    return make_ingress(two_models(tmp_path, cache_dir), monkeypatch)


KEY_A, KEY_B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
SMALL = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64}


def test_options_post_changes_the_callers_own_model_and_format_only(served):
    client, ingress = served
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    default = client.get("/sdapi/v1/options", headers=KEY_A).json()
    assert default["sd_model_checkpoint"] == models["sd"]["title"]
    assert default["sd_checkpoint_hash"] == models["sd"]["sha256"] and default["samples_format"] == "png"

    r = client.post(
        "/sdapi/v1/options",
        json={**default, "sd_model_checkpoint": models["xl"]["title"], "samples_format": "jpg"},
        headers=KEY_A,
    )
    assert r.status_code == 200, r.text
    assert r.json()["applied"] == ["CLIP_stop_at_last_layers", "samples_format", "sd_model_checkpoint", "sd_vae"]
    assert "sd_checkpoint_hash" in r.json()["ignored"]
    mine = client.get("/sdapi/v1/options", headers=KEY_A).json()
    assert (mine["sd_model_checkpoint"], mine["sd_checkpoint_hash"]) == (models["xl"]["title"], models["xl"]["sha256"])
    for other in (KEY_B, {}):  # another key, and an anonymous caller: unchanged
        assert client.get("/sdapi/v1/options", headers=other).json() == default

    assert client.post("/sdapi/v1/txt2img", json=SMALL, headers=KEY_A).status_code == 200
    plan = ingress.graph.plans[-1]
    assert (plan.model, plan.output_format) == ("xl", "jpeg")
    info = json.loads(client.post("/sdapi/v1/txt2img", json=SMALL, headers=KEY_B).json()["info"])
    assert (ingress.graph.plans[-1].model, ingress.graph.plans[-1].output_format) == ("sd", "png")
    assert info["sd_model_name"] == "sd" and info["stopped"] is None
    # override_settings still wins over the caller's selection.
    body = {**SMALL, "override_settings": {"sd_model_checkpoint": "sd"}}
    assert client.post("/sdapi/v1/txt2img", json=body, headers=KEY_A).status_code == 200
    assert ingress.graph.plans[-1].model == "sd"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"),
        ({"samples_format": "tiff"}, "samples_format"),
        ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
    ],
)
def test_options_post_with_a_bad_value_is_a_422_and_applies_nothing(served, body, field):
    client, _ = served
    r = client.post("/sdapi/v1/options", json={"samples_format": "webp", **body}, headers=KEY_A)
    assert r.status_code == 422 and is_error_shape(r.json()) and r.json()["error"]["field"] == field
    assert client.get("/sdapi/v1/options", headers=KEY_A).json()["samples_format"] == "png"


def test_options_post_must_be_an_object(served):
    client, _ = served
    r = client.post("/sdapi/v1/options", json=["sd_model_checkpoint"], headers=KEY_A)
    assert r.status_code == 422 and is_error_shape(r.json())


def test_listings(served):
    client, _ = served
    assert client.get("/sdapi/v1/schedulers").json() == schedulers()
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["api_auth"] is None and flags["nowebui"] is False
    memory = client.get("/sdapi/v1/memory").json()
    import psutil
    import torch

    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] == psutil.virtual_memory().total
    assert memory["ram"]["free"] == memory["ram"]["total"] - memory["ram"]["used"]
    if torch.cuda.is_available():
        assert memory["cuda"]["system"]["total"] > 0
    else:
        assert memory["cuda"] == {"error": "unavailable"}


def test_progress_interrupt_and_skip_without_work(served):
    client, _ = served
    out = client.get("/sdapi/v1/progress", headers=KEY_A).json()
    assert (out["progress"], out["state"]["job_count"], out["current_image"]) == (0.0, 0, None)
    assert client.post("/sdapi/v1/interrupt", headers=KEY_A).json() == {"interrupted": 0}
    assert client.post("/sdapi/v1/skip", headers=KEY_A).json() == {"skipped": 0}
