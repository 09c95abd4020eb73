"""The OpenAI Images API front end without Ray: names in (generations, edits, the mask's alpha), delivery
(formats, compression, URLs held in the job store, OpenAI's stream events checked against openai-python's
own types), errors in OpenAI's shape, and the job store's per-job TTL and event ids that the URLs and the
framework's SSE rely on. Routes run in-process (the real ingress app, a fake graph, a real ``JobManager``)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
    ImagesResponse,
)
from PIL import Image

from deployments.engine.images import encode_image
from deployments.messages import DecodedImages, Preview, Step
from graph import errors, openai_images
from graph.config import LimitsConfig
from graph.errors import APIError, FieldError
from graph.job_store import KEEP_ALIVE, Job, JobEvent, JobManager, JobStore
from graph.openai_images import EDIT, GENERATION, Delivery
from graph.schemas import OpenAIEditForm, OpenAIImagesRequest

from conftest import make_plan
from ingress_helpers import app_config, make_ingress


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def png(color=(200, 40, 40), size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(seed: int = 0, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def delivery(**fields) -> Delivery:
    return openai_images.delivery(OpenAIImagesRequest.model_validate({"prompt": "p", **fields}), GENERATION)


# -- names in ----------------------------------------------------------------------------------------


def test_todays_generate_fields_are_accepted_and_translated():
    body = {
        "prompt": "a boat",
        "n": 2,
        "size": "auto",
        "background": "opaque",
        "moderation": "low",
        "quality": "high",
        "style": "vivid",
        "output_format": "webp",
        "output_compression": 60,
        "user": "u",
        "safety_identifier": "s",
        "stream": True,
        "partial_images": 2,
        "response_format": "url",
    }
    request, names = openai_images.to_input(OpenAIImagesRequest.model_validate(body), "user:s")
    assert (request.num_images, request.width, request.height, request.tenant) == (2, None, None, "user:s")
    assert request.output_format == "png"  # the graph's lossless PNG, re-encoded at quality 60 here
    assert names.outward("num_images") == "n" and names.outward("width") == "size"
    how = openai_images.delivery(OpenAIImagesRequest.model_validate(body), GENERATION)
    assert how == Delivery(GENERATION, "webp", 60, "url", "high", True, 2)


@pytest.mark.parametrize(
    "fields, graph_format, reencode",
    [
        ({}, "png", False),
        ({"output_format": "jpeg"}, "jpeg", False),  # the server's JPEG (quality 95)
        ({"output_format": "jpeg", "output_compression": 100}, "png", True),
        ({"output_format": "webp", "output_compression": 100}, "webp", False),  # lossless, as the graph makes it
        ({"output_format": "webp", "output_compression": 40}, "png", True),
        ({"output_format": "png", "output_compression": 10}, "png", False),  # png: ignored
    ],
)
def test_output_compression_reencodes_jpeg_and_webp_only(fields, graph_format, reencode):
    how = delivery(**fields)
    assert (how.graph_format, how.reencode) == (graph_format, reencode)


@pytest.mark.parametrize(
    "size, expected",
    [(None, (None, None)), ("auto", (None, None)), ("512x768", (512, 768)), ("64X64", (64, 64))],
)
def test_sizes(size, expected):
    assert openai_images.parse_size(size) == expected


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({"background": "transparent"}, "background", 'background "transparent" is not served'),
        ({"size": "huge"}, "size", 'size must look like "512x512", got \'huge\' (or "auto": the native size)'),
    ],
)
def test_what_is_not_served_is_a_422_naming_the_field(body, field, message):
    with pytest.raises(APIError) as e:
        req = OpenAIImagesRequest.model_validate({"prompt": "p", **body})
        openai_images.delivery(req, GENERATION)
        openai_images.to_input(req, "anonymous")
    assert (e.value.status, e.value.field) == (422, field) and e.value.message.startswith(message)


@pytest.mark.parametrize(
    "steps, partial_images, every, previews",
    [(10, 3, 3, [3, 6, 9]), (4, 3, 1, [1, 2, 3]), (2, 3, 1, [1]), (30, 1, 15, [15]), (30, 0, 0, [])],
)
def test_previews_are_spread_so_at_most_partial_images_come(steps, partial_images, every, previews):
    how = Delivery(GENERATION, "png", None, "b64_json", "auto", True, partial_images)
    assert how.preview_every_steps(steps) == every
    # the Denoiser previews at each multiple of ``every`` short of the last step (deployments/denoiser.py)
    assert [s for s in range(1, steps) if every and s % every == 0] == previews


def test_an_openai_mask_marks_its_transparent_pixels_for_repainting():
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[2:5, 3:9, 3] = 0  # fully transparent: edit here
    rgba[6, 0, 3] = 1  # almost transparent: kept (OpenAI: only alpha 0 is edited)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    native = openai_images.mask_from_alpha(buf.getvalue(), LimitsConfig())
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(native))).convert("L"))
    expected = np.zeros((8, 16), dtype=np.uint8)
    expected[2:5, 3:9] = 255
    assert np.array_equal(mask, expected)


def test_a_mask_without_alpha_or_too_large_is_a_422_on_mask():
    with pytest.raises(FieldError) as e:
        openai_images.mask_from_alpha(png(), LimitsConfig())
    assert (e.value.status, e.value.field, e.value.code) == (422, "mask", "invalid_image")
    assert "alpha channel" in e.value.message
    with pytest.raises(FieldError) as e:
        openai_images.mask_from_alpha(png(size=(100, 100)), LimitsConfig(max_image_pixels=4096))
    assert e.value.field == "mask" and "limit is 4096 pixels" in e.value.message


def test_an_edit_is_img2img_or_with_a_mask_inpainting():
    form = OpenAIEditForm.model_validate({"prompt": "p", "n": "2", "size": "auto", "strength": "0.5", "steps": "8"})
    request, names = openai_images.edit_input(form, png(), None, "anonymous", LimitsConfig())
    assert (request.num_images, request.strength, request.steps, request.mask, request.width) == (2, 0.5, 8, None, None)
    assert base64.b64decode(request.image) == png()
    masked, _ = openai_images.edit_input(form, png(), png((0, 0, 0, 0), mode="RGBA"), "anonymous", LimitsConfig())
    white = np.asarray(Image.open(io.BytesIO(base64.b64decode(masked.mask))).convert("L"))
    assert (white == 255).all() and names.outward("num_images") == "n"


def test_jpeg_and_webp_are_reencoded_at_the_asked_quality():
    image = noise_png()
    low = openai_images.encode_output((image,), delivery(output_format="jpeg", output_compression=10))[0]
    high = openai_images.encode_output((image,), delivery(output_format="jpeg", output_compression=90))[0]
    assert Image.open(io.BytesIO(low)).format == "JPEG" and len(low) < len(high)
    webp = openai_images.encode_output((image,), delivery(output_format="webp", output_compression=50))[0]
    assert Image.open(io.BytesIO(webp)).format == "WEBP" and len(webp) < len(image)
    assert openai_images.encode_output((image,), delivery(output_format="webp", output_compression=100)) == (image,)


# -- errors in OpenAI's shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, kind",
    [
        (400, "invalid_request_error"),
        (404, "invalid_request_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_error_types_by_status(status, kind):
    assert errors.error_body(status, "c", "m", "n", openai=True) == {
        "error": {"message": "m", "type": kind, "param": "n", "code": "c"}
    }
    assert errors.error_body(status, "c", "m", "n") == {"error": {"code": "c", "message": "m", "field": "n"}}


@pytest.mark.parametrize(
    "path, openai",
    [("/v1/images/generations", True), ("/v1/images/edits", True), ("/v1/images/files/x/0.png", True)]
    + [("/v1/generate", False), ("/v1/jobs", False), ("/sdapi/v1/txt2img", False), ("/v1/models", False)],
)
def test_the_openai_shape_is_for_the_openai_routes(path, openai):
    assert errors.is_openai_path(path) is openai
    assert errors.app_path({"path": "/multi" + path, "root_path": "/multi"}) == path


# -- OpenAI's stream events --------------------------------------------------------------------------


def frames(chunks: list[bytes]) -> list[tuple[str | None, dict | None]]:
    """(event, data) of each frame; comments as ("comment", None)."""
    out = []
    for frame in b"".join(chunks).decode().split("\n\n"):
        if not frame:
            continue
        if frame.startswith(":"):
            out.append(("comment", None))
            continue
        fields = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((fields.get("event"), json.loads(fields["data"]) if "data" in fields else None))
    return out


def preview(step: int) -> Preview:
    return Preview(step=step, steps=10, image="data:image/png;base64," + base64.b64encode(png(size=(8, 8))).decode())


async def collect(stream) -> list[bytes]:
    return [chunk async for chunk in stream]


@pytest.mark.parametrize(
    "kind, partial, completed",
    [(GENERATION, ImageGenPartialImageEvent, ImageGenCompletedEvent)]
    + [(EDIT, ImageEditPartialImageEvent, ImageEditCompletedEvent)],
)
def test_a_stream_sends_partial_images_then_each_image_in_openais_types(kind, partial, completed):
    how = Delivery(kind, "jpeg", None, "b64_json", "high", True, 2)

    async def run(on_event):
        for event in (Step(step=1, steps=10, eta_s=1.0), preview(3), preview(6), preview(9)):
            on_event(event)  # a third preview is more than partial_images: not sent
        return DecodedImages((b"image-0", b"image-1"), 0.0, 0.0, 0.0, 0.0)

    events = frames(asyncio.run(collect(openai_images.stream(run, how, 64, 32))))
    assert [name for name, _ in events] == [f"{kind}.partial_image"] * 2 + [f"{kind}.completed"] * 2
    parts = [partial.model_validate(data) for _, data in events[:2]]
    assert [p.partial_image_index for p in parts] == [0, 1]
    assert {(p.size, p.output_format, p.quality, p.background) for p in parts} == {("64x32", "jpeg", "high", "opaque")}
    first = Image.open(io.BytesIO(base64.b64decode(parts[0].b64_json)))
    assert (first.format, first.size) == ("JPEG", (64, 32))  # the 8x8 preview, at the output size
    done = [completed.model_validate(data) for _, data in events[2:]]
    assert [base64.b64decode(d.b64_json) for d in done] == [b"image-0", b"image-1"]
    assert all(d.type == f"{kind}.completed" and d.usage.total_tokens == 0 for d in done)


def test_a_failure_after_the_stream_began_is_an_error_event_in_openais_shape():
    how = Delivery(GENERATION, "png", None, "b64_json", "auto", True, 1)

    async def run(on_event):
        on_event(preview(5))
        raise APIError(503, "overloaded", "the denoiser queue is full", None)

    events = frames(asyncio.run(collect(openai_images.stream(run, how, 64, 64))))
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    assert events[1][1] == {
        "error": {"message": "the denoiser queue is full", "type": "server_error", "param": None, "code": "overloaded"}
    }


def test_an_idle_stream_gets_keep_alives_and_leaving_it_cancels_the_run():
    how = Delivery(GENERATION, "png", None, "b64_json", "auto", True, 0)
    release, cancelled = asyncio.Event(), []

    async def main():
        async def run(on_event):
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return DecodedImages((b"x",), 0.0, 0.0, 0.0, 0.0)

        stream = openai_images.stream(run, how, 64, 64, ping_s=0.01)
        assert await anext(stream) == b": ping\n\n"  # nothing came within ping_s
        release.set()
        rest = [chunk async for chunk in stream]
        assert [name for name, _ in frames(rest) if name != "comment"] == ["image_generation.completed"]
        stream = openai_images.stream(run, how, 64, 64, ping_s=0.01)
        release.clear()
        await anext(stream)
        await stream.aclose()  # the client left
        await asyncio.sleep(0)
        assert cancelled == [True]

    asyncio.run(main())


# -- the job store: per-job TTL (image URLs), event ids --------------------------------------------------


def test_kept_images_expire_after_their_own_ttl_others_after_the_stores():
    async def main():
        clock = Clock()
        store = JobStore(10, ttl_s=600, clock=clock)
        manager = JobManager(store, run=None)
        plan = make_plan(seed=7, applied=(("ink@2", 0.5),))
        kept = await manager.keep(plan, (b"png-0", b"png-1"), ttl_s=3600)
        assert kept.to_dict()["status"] == "done" and kept.to_dict()["loras"] == [{"ref": "ink@2", "scale": 0.5}]
        assert [(im["seed"], im["width"]) for im in kept.images] == [(7, 64), (8, 64)]
        assert (manager.image(kept.id, 0), manager.image(kept.id, 1), manager.image(kept.id, 2)) == (
            b"png-0",
            b"png-1",
            None,
        )
        other = Job(id="j", seed=1, steps=4, loras=[], created=1000.0, updated=1000.0)
        store.add(other)
        store.finish(other, "done", images=[])
        instant = await manager.keep(plan, (b"x",), ttl_s=0)
        assert manager.image(instant.id, 0) is None  # a TTL of 0: expired at once
        clock.now = 1000.0 + 599
        assert store.get("j") is other and manager.image(kept.id, 0) == b"png-0"
        clock.now = 1000.0 + 600
        assert store.get("j") is None and manager.image(kept.id, 0) == b"png-0"
        clock.now = 1000.0 + 3600
        assert manager.image(kept.id, 0) is None and len(store) == 0 and store.expired == 3

    asyncio.run(main())


def test_kept_images_carry_their_ttl_through_the_durable_record():
    record = Job(id="k", seed=1, steps=4, loras=[], created=0.0, updated=0.0, status="done", ttl_s=3600.0)
    record.finished_at = 0.0
    assert Job.from_record(json.loads(json.dumps(record.to_record()))).ttl_s == 3600.0


def test_event_ids_name_the_state_shown_and_last_event_id_resumes_after_it():
    async def main():
        clock = Clock()
        store = JobStore(10, 600, clock=clock)
        manager = JobManager(store, run=None, heartbeat_s=60)
        job = Job(id="j", seed=1, steps=4, loras=[], created=1000.0, updated=1000.0)
        store.add(job)
        job.touch(clock())  # version 1
        job.preview = {"step": 2, "steps": 4, "image": "data:"}
        job.touch(clock(), preview=True)  # preview 1
        first = manager.events("j", previews=True)
        assert await anext(first) == JobEvent("status", job.to_dict(images=False), "1.0")
        assert await anext(first) == JobEvent("preview", job.preview, "1.1")
        await first.aclose()
        resumed = manager.events("j", previews=True, last_event_id="1.1")  # nothing new: it waits
        waiting = asyncio.ensure_future(anext(resumed))
        await asyncio.sleep(0)
        assert not waiting.done()
        job.touch(clock())  # version 2
        assert await waiting == JobEvent("status", job.to_dict(images=False), "2.1")
        await resumed.aclose()
        store.finish(job, "done", images=[])
        again = [e async for e in manager.events("j", previews=True, last_event_id="junk")]
        assert again == [JobEvent("done", job.to_dict(), f"{job.version}.1")]
        assert KEEP_ALIVE.comment == "keep-alive"

    asyncio.run(main())


# -- the routes, in-process -----------------------------------------------------------------------------


class StreamingGraph:
    """``GraphClient.run``: previews through ``on_event`` when asked, then noise images in the plan's format."""

    def __init__(self):
        self.plans, self.calls, self.made = [], [], []

    async def run(self, plan, on_event=None, preview_every_steps=0):
        self.plans.append(plan)
        self.calls.append(preview_every_steps)
        if on_event is not None:
            for step in range(preview_every_steps, plan.steps, preview_every_steps or plan.steps):
                on_event(Preview(step=step, steps=plan.steps, image=preview(step).image))
        pixels = [
            np.asarray(Image.open(io.BytesIO(noise_png(plan.seed + k, (plan.width, plan.height)))))
            for k in range(plan.num_images)
        ]
        self.made = [encode_image(p, plan.output_format) for p in pixels]
        return DecodedImages(tuple(self.made), 0.0, 0.0, 0.0, 0.0)


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return await self.fn(*args)


class JobsHandle:
    """The Jobs deployment's handle over a real ``JobManager``: ``keep`` and ``image``, as ``graph/jobs.py``."""

    def __init__(self, manager: JobManager):
        self.manager = manager

    @property
    def keep(self):
        async def keep(plan, images, ttl_s):
            return {"job": {"id": (await self.manager.keep(plan, images, ttl_s)).id}}

        return _Remote(keep)

    @property
    def image(self):
        async def image(job_id, index):
            return self.manager.image(job_id, index)

        return _Remote(image)


@pytest.fixture
def served(tmp_path, cache_dir):
    mp = pytest.MonkeyPatch()
    client, ingress = make_ingress(app_config(tmp_path, cache_dir, openai={"image_url_ttl_s": 3600}), mp)
    ingress.graph = StreamingGraph()
    clock = Clock()
    ingress.jobs = JobsHandle(JobManager(JobStore(10, 600, clock=clock), run=None))
    yield client, ingress, clock
    mp.undo()


def test_url_responses_serve_the_image_under_the_route_prefix_until_they_expire(served):
    from fastapi.testclient import TestClient

    from graph import ingress as ingress_module

    _, ingress, clock = served
    client = TestClient(ingress_module.app, root_path="/apps/one", raise_server_exceptions=False)
    body = {"prompt": "a boat", "n": 2, "size": "64x64", "seed": 5, "response_format": "url", "output_format": "webp"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    answer = ImagesResponse.model_validate(r.json())
    urls = [d.url for d in answer.data]
    assert all(d.b64_json is None for d in answer.data) and (answer.size, answer.output_format) == ("64x64", "webp")
    prefix = "http://testserver/apps/one/v1/images/files/"
    assert all(u.startswith(prefix) for u in urls) and [u.split("/")[-1].split("?")[0] for u in urls] == [
        "0.webp",
        "1.webp",
    ]
    file_id = urls[0].removeprefix(prefix).split("/")[0]
    assert len(base64.urlsafe_b64decode(file_id + "==")) == 16  # 128 random bits
    for k, url in enumerate(urls):
        got = client.get(url.removeprefix("http://testserver/apps/one"))
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
        assert got.content == ingress.graph.made[k]  # the graph's own lossless WebP, byte for byte
    clock.now += 3600  # the store's clock: the kept job's TTL has passed
    gone = client.get(urls[0].removeprefix("http://testserver/apps/one").split("?")[0])
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"
    past = client.get(f"/v1/images/files/{file_id}/0.webp?expires=1000")
    assert past.status_code == 404 and past.json()["error"] == {
        "message": "this image URL expired at 1970-01-01T00:16:40Z; image URLs serve their image for "
        "openai.image_url_ttl_s seconds",
        "type": "invalid_request_error",
        "param": None,
        "code": "image_expired",
    }


def test_url_images_are_the_b64_images(served):
    client, ingress, _ = served
    body = {"prompt": "a boat", "size": "64x64", "seed": 5, "output_format": "jpeg", "output_compression": 30}
    inline = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    url = client.post("/v1/images/generations", json={**body, "response_format": "url"}).json()["data"][0]["url"]
    assert client.get(url.removeprefix("http://testserver")).content == base64.b64decode(inline)
    assert ingress.graph.plans[-1].output_format == "png"  # re-encoded at the edge at quality 30


def test_a_streamed_request_answers_openai_events(served):
    client, ingress, _ = served
    body = {"prompt": "a boat", "size": "64x64", "steps": 9, "stream": True, "partial_images": 2, "n": 2}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = frames([chunk for chunk in r.iter_bytes()])
    assert ingress.graph.calls[-1] == 3  # ceil(9 / (2 + 1)): previews at steps 3 and 6
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    assert [ImageGenCompletedEvent.model_validate(d).size for _, d in events[2:]] == ["64x64", "64x64"]


def test_edits_route_img2img_and_inpainting_and_their_errors(served):
    client, ingress, _ = served
    image = ("in.png", png(size=(72, 64)), "image/png")
    r = client.post("/v1/images/edits", files={"image": image}, data={"prompt": "x", "steps": "4", "seed": "3"})
    assert r.status_code == 200, r.text
    plan = ingress.graph.plans[-1]
    assert (plan.mode, plan.width, plan.height, plan.conditioning.strength) == ("img2img", 72, 64, 0.75)
    mask = ("m.png", png((0, 0, 0, 0), size=(72, 64), mode="RGBA"), "image/png")
    r = client.post("/v1/images/edits", files={"image[]": image, "mask": mask}, data={"prompt": "x", "size": "64x64"})
    assert r.status_code == 200, r.text
    plan = ingress.graph.plans[-1]
    assert (plan.mode, plan.width, plan.conditioning.strength, float(plan.conditioning.mask.min())) == (
        "inpaint",
        64,
        1.0,
        1.0,
    )
    bad = [
        ({"image": image}, {"prompt": "x", "n": "nine"}, "n", "invalid_value"),
        ({"image": image}, {"prompt": "x", "markup": "1"}, "markup", "unknown_field"),
        ({"image": image}, {"n": "1"}, "prompt", "missing_field"),
        ({}, {"prompt": "x"}, "image", "missing_field"),
        (
            {"image": image, "mask": ("m.png", png(size=(72, 64)), "image/png")},
            {"prompt": "x"},
            "mask",
            "invalid_image",
        ),
        (
            {"image": image, "mask": ("m.png", png(size=(8, 8), mode="RGBA"), "image/png")},
            {"prompt": "x"},
            "mask",
            None,
        ),
        ({"image": ("in.png", b"nope", "image/png")}, {"prompt": "x"}, "image", "invalid_image"),
        ({"image": image}, {"prompt": "x", "n": "9"}, "n", "invalid_value"),
        ({"image": image}, {"prompt": "x", "background": "transparent"}, "background", "unsupported_value"),
    ]
    for files, data, param, code in bad:
        if not files:
            r = client.post("/v1/images/edits", data=data, files={"other": ("o.txt", b"", "text/plain")})
            param, code = "other", "unknown_field"
        else:
            r = client.post("/v1/images/edits", files=files, data=data)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
        assert code is None or error["code"] == code, error
    r = client.post("/v1/images/edits", data={"prompt": "x"})  # no file part at all
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"


def test_the_jobs_event_route_is_framed_by_fastapi_with_ids_and_retry(tmp_path, cache_dir):
    mp = pytest.MonkeyPatch()
    try:
        client, ingress = make_ingress(app_config(tmp_path, cache_dir), mp)
        store = JobStore(10, 600)
        manager = JobManager(store, run=None)
        job = Job(id="j", seed=1, steps=4, loras=[], created=1.0, updated=1.0)
        store.add(job)
        job.touch(2.0)
        store.finish(job, "done", images=[])

        class Stream:  # a DeploymentResponseGenerator: iterated, then cancelled
            def __init__(self, events):
                self.events, self.cancelled = events, False

            def __aiter__(self):
                return self.events

            def cancel(self):
                self.cancelled = True

        streams = []

        class Events:
            def remote(self, job_id, previews, last_event_id):
                streams.append(Stream(manager.events(job_id, previews, last_event_id)))
                return streams[-1]

        class Handle:
            class get:  # noqa: N801 - the handle's method name
                @staticmethod
                async def remote(job_id, images=True):
                    found = manager.get(job_id)
                    return None if found is None else found.to_dict(images=images)

            def options(self, stream):
                return type("Streaming", (), {"events": Events()})()

        ingress.jobs = Handle()
        r = client.get("/v1/jobs/nope/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"  # before any stream
        r = client.get("/v1/jobs/j/events", headers={"Last-Event-ID": "1.0"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        lines = r.text.split("\n")
        assert lines[0] == "event: done" and lines[1].startswith("data: {")
        assert json.loads(lines[1].removeprefix("data: "))["status"] == "done"
        assert lines[2:4] == [f"id: {job.version}.0", "retry: 2000"]
        assert [s.cancelled for s in streams] == [True]  # the relay stops the Jobs replica's generator
    finally:
        mp.undo()


# -- IP-Adapter (#22): an edit's style reference (style_image, style_scale) --------------------------------------


@pytest.fixture
def styled(tmp_path, cache_dir):
    """The app on tiny-sd served with its builtin IP-Adapter, and one served without (the default config)."""
    mp = pytest.MonkeyPatch()
    client, ingress = make_ingress(app_config(tmp_path, cache_dir, model={"ip_adapter": {}}), mp)
    ingress.graph = StreamingGraph()
    yield client, ingress
    mp.undo()


def test_an_edits_style_image_is_a_file_part_or_base64_text_and_its_scale_a_number_or_json(styled):
    client, ingress = styled
    image = ("in.png", png(size=(64, 64)), "image/png")
    reference = png((10, 200, 30), size=(40, 24))
    expected = np.asarray(Image.open(io.BytesIO(reference)).convert("RGB"))
    data = {"prompt": "x", "steps": "2", "style_scale": "0.6"}
    r = client.post(
        "/v1/images/edits", files={"image": image, "style_image": ("s.png", reference, "image/png")}, data=data
    )
    assert r.status_code == 200, r.text
    plan = ingress.graph.plans[-1]
    assert plan.mode == "img2img" and plan.style_scale == 0.6
    assert np.array_equal(plan.style_image.pixels, expected)
    as_text = {
        "prompt": "x",
        "steps": "2",
        "style_image": "data:image/png;base64," + base64.b64encode(reference).decode(),
    }
    r = client.post(
        "/v1/images/edits", files={"image": image}, data={**as_text, "style_scale": '{"up": {"block_1": 1.0}}'}
    )
    assert r.status_code == 200, r.text
    plan = ingress.graph.plans[-1]
    assert (
        plan.style_scale == {"up": {"block_1": 1.0}}
        and plan.style_image.digest == ingress.graph.plans[-2].style_image.digest
    )
    r = client.post("/v1/images/edits", files={"image": image}, data={"prompt": "x", "steps": "2"})
    assert r.status_code == 200 and ingress.graph.plans[-1].style_image is None  # no style: the plain edit


def test_an_edits_style_errors_name_its_fields(styled, tmp_path, cache_dir):
    client, _ = styled
    image = ("in.png", png(), "image/png")
    style = ("s.png", png(), "image/png")
    bad = [
        ({"style_image": style}, {"style_scale": "3"}, "style_scale", "must be in [0, 2.0], got 3.0"),
        ({"style_image": style}, {"style_scale": "strong"}, "style_scale", "must be a number"),
        ({"style_image": style}, {"style_scale": "{nope"}, "style_scale", "JSON object"),
        ({"style_image": style}, {"style_scale": '{"side": 1}'}, "style_scale.side", "down, mid and up"),
        ({}, {"style_scale": "0.5"}, "style_scale", "needs a style_image"),
        ({"style_image": ("s.png", b"not an image", "image/png")}, {}, "style_image", ""),
        ({}, {"style_image": "!!!"}, "style_image", ""),
    ]
    for files, data, param, text in bad:
        r = client.post("/v1/images/edits", files={"image": image, **files}, data={"prompt": "x", **data})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == param and text in error["message"] and "\n" not in error["message"], error
    two = [("style_image", style), ("style_image", style), ("image", image)]
    r = client.post("/v1/images/edits", files=two, data={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "style_image"
    r = client.post("/v1/images/edits", files=[("image[]", image), ("image[]", image)], data={"prompt": "x"})
    assert r.status_code == 422 and "send it as style_image" in r.json()["error"]["message"]
    mp = pytest.MonkeyPatch()  # a model served without IP-Adapter weights
    plain, _ = make_ingress(app_config(tmp_path / "plain", cache_dir), mp)
    try:
        r = plain.post("/v1/images/edits", files={"image": image, "style_image": style}, data={"prompt": "x"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "style_image_unsupported"
        assert r.json()["error"]["param"] == "style_image"
    finally:
        mp.undo()
