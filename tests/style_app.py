"""A second app on the e2e cluster whose model is served with its builtin IP-Adapter (``model.ip_adapter``), under a
route prefix: the front ends' style tests (A1111's ControlNet unit, OpenAI edits, the page) run against it while
the session's main app stays as it is. One per test module (``deployed``), deleted after it."""

from __future__ import annotations

import contextlib

import requests

from conftest import wait_until

STYLE_APP, STYLE_PREFIX = "lorafleet-style", "/style"


@contextlib.contextmanager
def deployed(cluster, cache_dir, tmp_path_factory, *, denoiser=None, image_encoder=None, **sections):
    """Yield the style app's URL (``cluster.url + STYLE_PREFIX``) once it is ready; delete it afterwards.

    ``denoiser`` / ``image_encoder``: settings over the one-replica defaults; ``sections``: more config sections."""
    from ray import serve

    from graph.app import build_app

    root = tmp_path_factory.mktemp("style-app")
    one = {"autoscaling": None, "num_replicas": 1}
    config = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir), "ip_adapter": {}},
        "text_encoder": one,
        "denoiser": {**one, "max_rows_per_tick": 8, "preempt": False, **(denoiser or {})},  # HeldDenoiser stays held
        "vae": one,
        "image_encoder": {**one, **(image_encoder or {})},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "jobs": {"durable": False},
        **sections,
    }
    serve.run(build_app(config), name=STYLE_APP, route_prefix=STYLE_PREFIX)
    url = cluster.url + STYLE_PREFIX

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the style app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield url
    finally:
        serve.delete(STYLE_APP)
