"""Async jobs end to end through real HTTP: create, poll, Server-Sent Events with previews, cancel,
queue position and ETA under saturation, and a synchronous client that hangs up cancelling its work."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image
from test_e2e_http import BAD

from conftest import HeldDenoiser, wait_until

pytestmark = pytest.mark.e2e

SMALL = {"width": 64, "height": 64}
# 150 steps at 128x128: over ten seconds of denoising on 2 CPU cores, so that cancelling shows.
LONG = {"prompt": "a very long job", "steps": 150, "width": 128, "height": 128}


def create(cluster, body: dict) -> dict:
    r = requests.post(cluster.url + "/v1/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def get(cluster, job_id: str) -> requests.Response:
    return requests.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=60)


def wait_job(cluster, job_id: str, until, timeout_s: float = 120, interval_s: float = 0.02) -> list[dict]:
    """Poll the job until ``until(job)``; every job object seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        r = get(cluster, job_id)
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if until(seen[-1]):
            return seen
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(interval_s)


def wait_idle(cluster, timeout_s: float = 60) -> dict:
    """The Denoiser's stats once nothing is running or waiting on it."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = cluster.stats("Denoiser")
        if stats["active"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def wait_busy(cluster, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = cluster.stats("Denoiser")
        if stats["active"] > 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def sse_events(response: requests.Response):
    """Parse a text/event-stream into (event, data) pairs as they arrive; comments as ("comment", text)."""
    event, data = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if event is not None or data:
                yield event or "message", json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())


def png(data_url_or_b64: str) -> Image.Image:
    b64 = data_url_or_b64.removeprefix("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def test_a_job_is_accepted_polled_to_done_and_equals_the_synchronous_image(cluster):
    body = {"prompt": "a lighthouse at dusk", "seed": 11, "steps": 30, "num_images": 2, **SMALL}
    # A queued job's eta_s comes from the Denoiser's measured step time: measure one first, whatever ran before.
    warm = requests.post(f"{cluster.url}/v1/generate", json={"prompt": "warm", "steps": 2, **SMALL}, timeout=120)
    assert warm.status_code == 200, warm.text
    with HeldDenoiser(cluster) as held:  # the job waits until released, however fast the machine
        created = create(cluster, body)
        job_id = created["id"]
        assert created == {
            "id": job_id,
            "status": "queued",
            "url": f"/v1/jobs/{job_id}",
            "events_url": f"/v1/jobs/{job_id}/events",
        }
        assert len(job_id) >= 16
        held.wait_waiting(2)
        queued = wait_job(cluster, job_id, lambda j: j["position"] is not None)[-1]
        assert (queued["status"], queued["position"], queued["step"], queued["progress"]) == ("queued", 0, 0, 0.0)
        assert queued["eta_s"] > 0
    seen = wait_job(cluster, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    done = seen[-1]
    assert done["status"] == "done", done
    order = {"queued": 0, "running": 1, "done": 2}
    statuses = [order[s["status"]] for s in seen]  # a KeyError: a status it should never have
    assert statuses == sorted(statuses)  # queued, running, done: never back
    steps_seen = [s["step"] for s in seen]
    assert steps_seen == sorted(steps_seen)  # never goes back
    assert (done["step"], done["steps"], done["progress"], done["position"]) == (30, 30, 1.0, None)
    assert done["seed"] == 11 and done["loras"] == [] and done["updated"] >= done["created"]
    assert [(im["seed"], im["width"], im["height"]) for im in done["images"]] == [(11, 64, 64), (12, 64, 64)]
    sync = requests.post(cluster.url + "/v1/generate", json=body, timeout=120).json()
    assert [im["b64"] for im in done["images"]] == [im["b64"] for im in sync["images"]]  # byte-equal PNGs


def test_events_stream_status_previews_and_the_final_event(cluster):
    held = HeldDenoiser(cluster)  # the job waits until released: its first event comes while it is queued
    created = create(cluster, {"prompt": "a red boat", "seed": 5, "steps": 40, "width": 128, "height": 128})
    url = cluster.url + created["events_url"] + "?previews=true"
    with held, requests.get(url, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = []
        for name, data in sse_events(r):
            if not events:
                # Streamed as it happens, not buffered until the end: the job has not even started.
                assert (name, data["status"]) == ("status", "queued")
                assert get(cluster, created["id"]).json()["status"] == "queued"
                held.release()
            events.append((name, data))
    names = [n for n, _ in events]
    assert names[0] == "status" and names[-1] == "done" and names.count("done") == 1
    statuses = [d for n, d in events if n == "status"]
    assert all("images" not in d for d in statuses)
    steps = [d["step"] for d in statuses]
    assert steps == sorted(steps) and len(set(steps)) > 3
    previews = [d for n, d in events if n == "preview"]
    assert previews and all(0 < p["step"] < 40 and p["steps"] == 40 for p in previews)
    assert [p["step"] % 5 for p in previews] == [0] * len(previews)  # jobs.preview_every_steps
    image = png(previews[0]["image"])
    assert image.size == (16, 16) and image.mode == "RGB"  # latent resolution
    final = events[-1][1]
    assert final["status"] == "done" and png(final["images"][0]["b64"]).size == (128, 128)

    # A client connecting after the end gets the final event at once; without previews=true, none.
    with requests.get(cluster.url + created["events_url"], stream=True, timeout=60) as r:
        assert [(n, d["status"]) for n, d in sse_events(r)] == [("done", "done")]
    other = create(cluster, {"prompt": "no previews", "steps": 12, **SMALL})
    with requests.get(cluster.url + other["events_url"], stream=True, timeout=120) as r:
        names = [n for n, _ in sse_events(r)]
    assert "preview" not in names and names[-1] == "done"


def raw_frames(response: requests.Response):
    """Each frame of a text/event-stream as its fields (``event``, ``data``, ``id``, ``retry``; ``:`` for a
    comment), one at a time as they arrive."""
    fields = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if fields:
                yield fields
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name or ":"] = value.removeprefix(" ")


def test_events_carry_ids_and_retry_and_resume_after_last_event_id(cluster):
    held = HeldDenoiser(cluster)  # queued until released: its first status is known before it runs
    created = create(cluster, {"prompt": "a resumed stream", "seed": 2, "steps": 6, **SMALL})
    url = cluster.url + created["events_url"]
    with held, requests.get(url, stream=True, timeout=120) as r:
        first = next(raw_frames(r))
    assert first["event"] == "status" and first["retry"] == "2000"  # FastAPI's SSE: the reconnection delay
    version, _, previews = first["id"].partition(".")
    assert version.isdigit() and previews == "0"
    wait_job(cluster, created["id"], lambda j: j["status"] == "done")
    with requests.get(url, stream=True, timeout=60) as r:
        frames = list(raw_frames(r))
    assert [f["event"] for f in frames] == ["done"] and frames[0]["retry"] == "2000"
    last = frames[0]["id"]
    assert int(last.partition(".")[0]) > int(version)
    # A reconnecting EventSource sends the last id it saw: the final event still comes, once.
    with requests.get(url, stream=True, timeout=60, headers={"Last-Event-ID": last}) as r:
        assert [(f["event"], f["id"]) for f in raw_frames(r)] == [("done", last)]


def test_delete_cancels_a_running_job_and_frees_the_denoiser(cluster):
    before = wait_idle(cluster)
    created = create(cluster, {**LONG, "seed": 3})
    wait_job(cluster, created["id"], lambda j: j["status"] == "running" and j["step"] >= 2)
    r = requests.delete(f"{cluster.url}/v1/jobs/{created['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and "images" not in r.json()
    after = wait_idle(cluster, timeout_s=60)
    # Its slot freed before its end (that it leaves at the very next step, test_jobs.py shows with the
    # ticks under its control; here ticks and the cancel's trip through Serve race each other).
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["ticks"] - before["ticks"] < 150
    job = get(cluster, created["id"]).json()
    assert job["status"] == "cancelled" and job["step"] < 150
    # Deleting a finished job removes it.
    assert requests.delete(f"{cluster.url}/v1/jobs/{created['id']}", timeout=60).status_code == 200
    assert get(cluster, created["id"]).status_code == 404


def test_unknown_job_is_a_404(cluster):
    for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        r = requests.request(method, f"{cluster.url}/v1/jobs/no-such-job{path}", timeout=30)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"


# /v1/generate's bad-input table (test_e2e_http.py); prompt length has its own case, far over any limit.
JOB_BAD = [case for case in BAD if case[2] != "prompt_too_long"] + [
    ({"prompt": "cat " * 400}, 422, "prompt_too_long", "prompt"),
    ({"prompt": "x", "negative_prompt": "dog " * 400}, 422, "prompt_too_long", "negative_prompt"),
]


@pytest.mark.parametrize("body, status, code, field", JOB_BAD)
def test_bad_body_is_the_same_error_as_generate(cluster, body, status, code, field):
    def send(path):
        if isinstance(body, str):
            headers = {"Content-Type": "application/json"}
            return requests.post(cluster.url + path, data=body, headers=headers, timeout=30)
        return requests.post(cluster.url + path, json=body, timeout=30)

    job, sync = send("/v1/jobs"), send("/v1/generate")
    assert job.status_code == status and job.json()["error"]["code"] == code and job.json()["error"]["field"] == field
    assert (job.status_code, job.json()) == (sync.status_code, sync.json())


def test_a_job_waiting_behind_a_saturated_denoiser_reports_position_and_eta(cluster):
    wait_idle(cluster)
    # max_rows_per_tick is 8 in the e2e config: two 2-image requests with guidance fill the batch.
    long = [create(cluster, {**LONG, "num_images": 2, "seed": s}) for s in (1, 2, 3)]
    try:
        # The first two requests' four images run, the third's two wait: only then does the later one come.
        wait_until(lambda: (s := cluster.stats("Denoiser"))["active"] == 4 and s["waiting"] == 2, "a full batch")
        later = create(cluster, {**LONG, "seed": 9})
        long.append(later)
        seen = wait_job(
            cluster, later["id"], lambda j: j["status"] == "queued" and j["position"] is not None and j["eta_s"]
        )
        job = seen[-1]
        assert job["position"] == 2  # the third request's two images go first
        assert job["eta_s"] > 0 and job["step"] == 0 and job["progress"] == 0.0
        first = wait_job(cluster, long[0]["id"], lambda j: j["status"] == "running")[-1]
        assert first["position"] is None and first["eta_s"] > 0
    finally:
        for created in long:
            requests.delete(f"{cluster.url}/v1/jobs/{created['id']}", timeout=60)
    wait_idle(cluster, timeout_s=15)


def test_a_synchronous_client_that_hangs_up_cancels_its_denoising(cluster):
    before = wait_idle(cluster)
    body = json.dumps({**LONG, "seed": 4}).encode()
    url = urlparse(cluster.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(
        b"POST /v1/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (url.netloc.encode(), len(body), body)
    )
    try:
        busy = wait_busy(cluster)
        wait_until(lambda: cluster.stats("Denoiser")["ticks"] >= busy["ticks"] + 2, "it to be denoising")
    finally:
        sock.close()
    after = wait_idle(cluster, timeout_s=60)
    assert busy["active"] == 1
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["ticks"] - before["ticks"] < 150  # it never ran to its end


def test_jobs_are_counted_by_outcome(cluster):
    from test_e2e_metrics import scrape, total, wait_for

    done_before = total(scrape(cluster), "ray_lorafleet_jobs", "_total", outcome="done")
    created = create(cluster, {"prompt": "counted", "steps": 2, **SMALL})
    wait_job(cluster, created["id"], lambda j: j["status"] == "done")
    after = wait_for(cluster, lambda f: total(f, "ray_lorafleet_jobs", "_total", outcome="done") >= done_before + 1)
    assert total(after, "ray_lorafleet_jobs_in_store", state="finished") >= 1


def test_a_job_with_a_webhook_posts_its_signed_job_object_when_done(cluster):
    from graph.webhooks import verify

    from conftest import WebhookReceiver, wait_until

    hook = WebhookReceiver([200])
    try:
        job = create(cluster, {"prompt": "a webhook job", "seed": 8, "steps": 3, **SMALL, "webhook_url": hook.url})
        done = wait_job(cluster, job["id"], lambda j: j["status"] == "done")[-1]
        wait_until(lambda: len(hook.requests) == 1, "the webhook")
        headers, body = hook.requests[0]
        assert verify(b"e2e-webhook-secret", headers["x-lorafleet-timestamp"], body, headers["x-lorafleet-signature"])
        payload = json.loads(body)
        assert payload["event"] == "job.done"
        assert payload["job"]["images"] == done["images"] and payload["job"]["id"] == job["id"]
    finally:
        hook.close()
    r = requests.post(cluster.url + "/v1/jobs", json={"prompt": "x", **SMALL, "webhook_url": "ftp://x/y"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["field"] == "webhook_url"
