"""Shared fixtures: the embedded default model, written once per test session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("LORAFLEET_TEST_CACHE") or tmp_path_factory.mktemp("lorafleet-cache"))
    os.environ["LORAFLEET_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    """``builtin:tiny-sd`` written out as an ordinary diffusers directory."""
    from deployments.engine.models import resolve_model_dir

    return resolve_model_dir("builtin:tiny-sd", cache_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model's parts, loaded through the same directory loader real checkpoints use."""
    from deployments.engine import models

    cpu = torch.device("cpu")
    return {
        "info": models.read_model_info("builtin:tiny-sd", tiny_dir),
        "tokenizer": models.load_tokenizer(tiny_dir),
        "text_encoder": models.load_text_encoder(tiny_dir, cpu, torch.float32),
        "unet": models.load_unet(tiny_dir, cpu, torch.float32),
        "vae": models.load_vae(tiny_dir, cpu, torch.float32),
    }


@pytest.fixture(scope="session")
def tiny_sdxl_dir(cache_dir) -> Path:
    """``builtin:tiny-sdxl`` (SDXL's architecture, small) written out as a diffusers directory."""
    from deployments.engine.models import resolve_model_dir

    return resolve_model_dir("builtin:tiny-sdxl", cache_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    """The tiny SDXL model's parts: as ``tiny``, plus ``tokenizer_2`` and ``text_encoder_2``."""
    from deployments.engine import models

    cpu = torch.device("cpu")
    d = tiny_sdxl_dir
    return {
        "info": models.read_model_info("builtin:tiny-sdxl", d),
        "tokenizer": models.load_tokenizer(d),
        "tokenizer_2": models.load_tokenizer(d, "tokenizer_2"),
        "text_encoder": models.load_text_encoder(d, cpu, torch.float32),
        "text_encoder_2": models.load_text_encoder(d, cpu, torch.float32, "text_encoder_2"),
        "unet": models.load_unet(d, cpu, torch.float32),
        "vae": models.load_vae(d, cpu, torch.float32),
    }


def make_plan(**overrides):
    """A checked ``graph.planning.Plan`` for tests that need one without a Planner: a 64x64 two-image request."""
    from graph.planning import Plan

    fields = {
        "prompt": "a boat",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 0,
        "num_images": 2,
        "scheduler": "default",
        "output_format": "png",
    }
    return Plan(**{**fields, **overrides})


async def until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait for ``condition()`` to hold; the deadline only turns a hang into a failure (never a race)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s} s"
        await asyncio.sleep(0.005)


class TickGate:
    """A ``StepScheduler`` whose ticks run only when the test allows them.

    A ``DenoiseLoop`` ticks in a worker thread, back to back while work remains, so without a
    gate the number of ticks that pass while a test looks (or cancels, or submits) depends on
    the machine's speed. Each ``allow`` lets one more tick through; ``ran`` counts finished ticks.
    """

    def __init__(self, steps):
        self._tick = steps.tick
        self._permits = threading.Semaphore(0)
        self._open = False
        self.ran = 0
        steps.tick = self._gated  # the loop looks ``steps.tick`` up at every tick

    def _gated(self):
        if not self._open:
            self._permits.acquire()
        finished = self._tick()
        self.ran += 1
        return finished

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    async def ticks(self, n: int) -> None:
        """Let ``n`` more ticks run and wait until they have."""
        target = self.ran + n
        self.allow(n)
        await until(lambda: self.ran >= target)

    def open(self) -> None:
        """Let every tick through from now on."""
        self._open = True
        self._permits.release()


@pytest.fixture
def tick_gate():
    """``tick_gate(steps) -> TickGate``; every gate is opened at the end, so no worker thread waits forever."""
    gates: list[TickGate] = []

    def gate(steps) -> TickGate:
        gates.append(TickGate(steps))
        return gates[-1]

    yield gate
    for g in gates:
        g.open()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback: the real S3 HTTP API, spoken to by boto3. Yields client kwargs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
    finally:
        server.stop()


class Cluster:
    """A running lorafleet app on a local Ray instance: its URL and Serve handles."""

    def __init__(self, url: str, app_name: str, s3: dict):
        self.url = url
        self.app_name = app_name
        self.s3 = s3
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.app_name)

    def stats(self, deployment: str) -> dict:
        return self.handle(deployment).stats.remote().result(timeout_s=30)


# Small bounds so overload is reachable in a test; everything else as shipped in serve_config.yaml.
# One replica each (no autoscaling) so that batching and overload are deterministic.
# No pausing for the fair share (denoiser.preempt): HeldDenoiser's batch must stay held whoever's requests arrive
# (its jobs are one tenant's; another tenant's image would pause one of them). tests/test_step_scheduler.py tests
# pausing on the engine, and the load test serves with it on, as shipped.
# No admission control (shipped on): its 503s past a capacity measured on this machine's speed would race the
# overload and queue tests here; tests/test_e2e_admission.py and test_e2e_isolation.py serve with it on.
E2E_OVERRIDES = {
    "admission": {"enabled": False},
    "denoiser": {
        "max_queued_images": 8,
        "max_rows_per_tick": 8,
        "autoscaling": None,
        "num_replicas": 1,
        "preempt": False,
    },
    "text_encoder": {"autoscaling": None, "num_replicas": 1},
    "vae": {"autoscaling": None, "num_replicas": 1},
    "jobs": {"webhook_secret": "e2e-webhook-secret"},
}


ADMIN_TOKEN = "e2e-admin-token"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, cache_dir, tiny_dir, s3_server):
    """One local Ray instance per test session (127.0.0.1 only), the app deployed with `serve deploy`.

    The adapter registry lives in moto's S3 server on loopback: the production boto3 path.
    """
    import subprocess
    import sys
    import time

    import ray
    import requests
    import yaml
    from ray import serve

    dashboard_port, http_port, metrics_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    for section, values in E2E_OVERRIDES.items():
        app["args"].setdefault(section, {}).update(values)
    app["args"]["model"]["cache_dir"] = str(cache_dir)
    import boto3

    boto3.client("s3", **s3_server).create_bucket(Bucket="lorafleet-e2e")
    app["args"]["registry"] = {
        "uri": "s3://lorafleet-e2e/adapters",
        "s3_endpoint_url": s3_server["endpoint_url"],
        "s3_region": s3_server["region_name"],
        "cache_dir": str(tmp_path_factory.mktemp("adapter-cache")),
        "manifest_ttl_s": 1.0,
    }
    app["args"]["admin"] = {"token": ADMIN_TOKEN}
    # Ray workers inherit this environment: boto3's credential chain finds moto's dummy keys.
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        namespace="lorafleet-tests",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        serve_cli = Path(sys.executable).with_name("serve")
        subprocess.run(
            [str(serve_cli), "deploy", str(path), "-a", f"http://127.0.0.1:{dashboard_port}"],
            check=True,
            timeout=180,
        )
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lorafleet did not become ready: {serve.status()}")
            time.sleep(1)
        cluster = Cluster(url, app["name"], s3_server)
        cluster.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        yield cluster
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


MULTI_APP, MULTI_PREFIX = "lorafleet-multi", "/multi"
COLD = {"autoscaling": {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 2}, "num_cpus": 0.25}


class MultiApp:
    def __init__(self, url: str):
        self.url = url

    def post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=300, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)


@pytest.fixture(scope="session")
def multi_app(cluster, cache_dir, tiny_sdxl_dir, tmp_path_factory):
    """Two base models behind one ingress under ``/multi`` (a second application on the session's Ray
    instance, deleted at the end): tiny-sd with one replica per stage, and tiny-sdxl with ``min_replicas: 0``
    on every stage (``num_cpus: 0.25`` each, so a test can keep its replicas from being placed by holding the
    free CPUs), back at zero 2 s after its last request."""
    from ray import serve

    from graph.app import build_app

    root = tmp_path_factory.mktemp("multi-app")
    config = {
        "models": [
            {"name": "tiny-sd", "uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
            {
                "name": "tiny-sdxl",
                "uri": "builtin:tiny-sdxl",
                "cache_dir": str(cache_dir),
                "text_encoder": COLD,
                "denoiser": {**COLD, "max_rows_per_tick": 8},
                "vae": COLD,
            },
        ],
        "text_encoder": {"autoscaling": None, "num_replicas": 1},
        "denoiser": {"autoscaling": None, "num_replicas": 1, "max_rows_per_tick": 8},
        "vae": {"autoscaling": None, "num_replicas": 1},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "admin": {"token": ADMIN_TOKEN},
        "jobs": {"cold_start_eta_s": 45.0},
    }
    serve.run(build_app(config), name=MULTI_APP, route_prefix=MULTI_PREFIX)
    app = MultiApp(cluster.url + MULTI_PREFIX)

    def ready() -> bool:
        try:
            return requests.get(app.url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the two-model app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield app
    finally:
        serve.delete(MULTI_APP)


def multi_running(deployment: str) -> int:
    """Running replicas of one of ``multi_app``'s deployments."""
    from ray import serve

    status = serve.status().applications[MULTI_APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@contextlib.contextmanager
def free_cpus_held():
    """Hold every free logical CPU of the session's Ray instance with a placeholder actor, so that no replica
    asking for CPUs can be placed until the block ends (a cold start kept waiting, deterministically)."""
    import ray

    @ray.remote(num_cpus=0)
    class Placeholder:
        def ready(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0.0)
    holder = Placeholder.options(num_cpus=free).remote() if free > 0 else None
    try:
        if holder is not None:
            ray.get(holder.ready.remote(), timeout=60)
        wait_until(lambda: ray.available_resources().get("CPU", 0.0) < 0.25, "every free CPU held", timeout_s=60)
        yield
    finally:
        if holder is not None:
            ray.kill(holder)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0, interval_s: float = 0.05):
    """Poll ``condition()`` until it holds (returns its value); the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout_s} s"
        time.sleep(interval_s)
    return value


class HeldDenoiser:
    """The e2e Denoiser's batch held full, so that requests sent meanwhile queue, all of them, until ``release``.

    Two async jobs of two 128x128 images with guidance fill ``max_rows_per_tick`` (8 rows) for 150
    steps; requests sent meanwhile wait, and a test waits for that state (``wait_waiting``) instead
    of hoping its requests arrive close enough together, or before the server is done. ``release``
    deletes the two jobs: they leave at the next tick, and the queued requests are admitted together.
    Each tick of the held batch carries exactly ``ROWS`` rows, which ``ticks_besides`` uses to tell
    the holding jobs' ticks apart from the others'.
    """

    ROWS = 8
    BODY = {"prompt": "holding the batch", "steps": 150, "width": 128, "height": 128, "num_images": 2}

    def __init__(self, cluster):
        import requests

        self.cluster = cluster
        wait_until(lambda: self._idle(cluster.stats("Denoiser")), "an idle Denoiser")
        self.jobs = []
        for seed in (1, 2):
            r = requests.post(cluster.url + "/v1/jobs", json={**self.BODY, "seed": seed}, timeout=60)
            assert r.status_code == 202, r.text
            self.jobs.append(r.json()["id"])
        # From here on every tick of theirs is a full one (the first job may have run a few on its own).
        self.before = wait_until(
            lambda: (s := cluster.stats("Denoiser"))["active"] == 4 and s, "the holding jobs to run together"
        )

    @staticmethod
    def _idle(stats: dict) -> bool:
        return stats["active"] == 0 and stats["waiting"] == 0

    def wait_waiting(self, images: int) -> dict:
        """The Denoiser's stats once ``images`` images wait behind the held batch."""
        stats = wait_until(lambda: (s := self.cluster.stats("Denoiser"))["waiting"] == images and s, "queued images")
        assert stats["active"] == 4, stats  # still held: nothing of the test's has started
        return stats

    def release(self) -> None:
        import requests

        for job_id in self.jobs:
            r = requests.delete(f"{self.cluster.url}/v1/jobs/{job_id}", timeout=60)
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        self.jobs = []

    def ticks_besides(self, after: dict, rows_besides: int) -> int:
        """Ticks since the hold began that were not the holding jobs', given the other rows run meanwhile.

        Each holding job runs ROWS / 2 rows a tick; ``release`` cancels them one after the other, so the last
        tick of theirs may carry one job alone: their ticks are ceil(held rows / ROWS)."""
        held_rows = after["rows"] - self.before["rows"] - rows_besides
        assert held_rows >= 0 and held_rows % (self.ROWS // 2) == 0, (held_rows, self.before, after)
        return after["ticks"] - self.before["ticks"] - -(-held_rows // self.ROWS)

    def __enter__(self) -> HeldDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        if self.jobs:
            self.release()


class WebhookReceiver:
    """A local HTTP server (webhook receiver) that records each POST and answers with the next of ``statuses``."""

    def __init__(self, statuses=(200,)):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, bytes]] = []
        outer = self
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        from http.server import ThreadingHTTPServer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


LEAKS = ("Traceback", "ray::", "/home", "/tmp", "/work", ".py", "site-packages", "127.0.0.1", "Actor")


def assert_clean_error(text: str) -> None:
    """An error body a user sees: one short line in the documented shape, nothing of the server's insides."""
    import json

    body = json.loads(text)
    error = body["error"]
    assert set(body) == {"error"} and set(error) == {"code", "message", "field"}, body
    assert len(text.encode()) < 500 and "\n" not in error["message"], text
    assert not [leak for leak in LEAKS if leak in text], text
    assert not re.search(r"0x[0-9a-f]{6,}|\b\d{1,3}(\.\d{1,3}){3}\b", text), text  # addresses, IPs


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Debian's chromium + chromium-driver) for a page test module."""
    from page_helpers import start_chromium

    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()
