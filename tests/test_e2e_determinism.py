"""Determinism under load, through real HTTP: an image does not depend on what runs beside it."""

from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.e2e

SMALL = {"width": 64, "height": 64}


def wait_until(condition, what: str, timeout_s: float = 120):
    """Poll ``condition()`` until it returns something truthy; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)
    return value


def test_an_image_is_byte_identical_alone_and_among_six_running_requests(cluster):
    # DDIM: one UNet forward per step, so the target takes exactly 6 ticks.
    target = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "seed": 11, "scheduler": "ddim"}
    target |= {"steps": 6, **SMALL}

    def generate() -> str:
        r = requests.post(cluster.url + "/v1/generate", json=target, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["images"][0]["b64"]

    alone = generate()
    wait_until(lambda: cluster.stats("Denoiser")["active"] == 0, "an idle denoiser")

    # Six different requests, each one UNet row (no guidance) and 150 steps: with the target's two
    # rows they fill one tick (max_rows_per_tick 8), and they run through the target's whole life.
    others = [
        {"prompt": f"a different scene {i}", "seed": 300 + i, "steps": 150, "guidance_scale": 1.0, "scheduler": s}
        for i, s in enumerate(["default", "ddim", "euler", "euler_a", "dpmpp_2m", "ddim"])
    ]
    jobs = []
    for body in others:
        r = requests.post(cluster.url + "/v1/jobs", json={**body, **SMALL}, timeout=60)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])

    def states() -> list[dict]:
        return [requests.get(f"{cluster.url}/v1/jobs/{j}", timeout=60).json() for j in jobs]

    try:
        wait_until(lambda: all(s["status"] == "running" for s in states()), "six running jobs")
        before = cluster.stats("Denoiser")
        together = generate()
        after = cluster.stats("Denoiser")
        assert [s["status"] for s in states()] == ["running"] * 6  # they ran before, during and after
    finally:
        for j in jobs:
            requests.delete(f"{cluster.url}/v1/jobs/{j}", timeout=60)

    ticks, rows = after["ticks"] - before["ticks"], after["rows"] - before["rows"]
    # Every tick in between carried the six; the target's 6 ticks carried its 2 rows besides them.
    assert rows == 6 * ticks + 2 * 6
    assert together == alone
