"""A local cluster for the load test (lorafleet and the baseline on one Ray instance) and a metrics sampler.

Everything binds to 127.0.0.1 on free ports; the Ray instance is this
process's own (``ray.init`` starts it, ``ray.shutdown`` ends it), never a
shared one. locust must not run in this process: gevent's monkey-patching
makes Ray hang.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, path: str = "/readyz", timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url + path, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} not ready after {timeout_s:.0f} s")
        time.sleep(1)


def served_model_sources(config) -> dict[str | None, tuple[str, str | None]]:
    """Each base model of an ``AppConfig``, default first: its name (None for a lone ``model`` section
    without one: the server names it) -> (uri, cache_dir), to build its synthetic adapters from."""
    return {s.name: (s.model.uri, s.model.cache_dir) for s in config.served_models()}


def listed_model_sources(url: str, admin_token: str | None) -> dict[str, str | None]:
    """``GET /v1/models`` of a running lorafleet: name -> uri, default first (the uri only for the admin token,
    else None)."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    r = requests.get(url + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return {m["id"]: m.get("uri") for m in r.json()["data"]}


@dataclass
class LocalCluster:
    """lorafleet at ``url`` (route /), the diffusers baseline at ``baseline_url`` (route /baseline).

    ``model_dir`` and ``model_name``: the default model's; ``model_sources``: every served model's
    name -> (uri, cache_dir), default first."""

    url: str
    metrics_url: str
    admin_token: str
    model_dir: Path
    model_name: str
    baseline_url: str | None = None
    apps: list[str] = field(default_factory=list)
    model_sources: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @classmethod
    def start(cls, config_path: Path, workdir: Path, overrides: dict | None = None) -> LocalCluster:
        """Start Ray and deploy lorafleet from ``config_path``'s args, its registry a fresh local directory."""
        import ray
        from ray import serve

        from deployments.engine.models import resolve_model_dir
        from graph.app import build_app
        from graph.config import AppConfig, load_serve_config

        _, args = load_serve_config(config_path)
        token = secrets.token_hex(16)
        args = dict(args)
        args["registry"] = {
            **(args.get("registry") or {}),
            "uri": str(workdir / "registry"),
            "cache_dir": str(workdir / "adapter-cache"),
        }
        args["admin"] = {**(args.get("admin") or {}), "token": token}
        for section, values in (overrides or {}).items():
            args[section] = {**(args.get(section) or {}), **values}
        config = AppConfig.load(args)
        sources = served_model_sources(config)  # `models:` or the lone `model` section
        model_dir = resolve_model_dir(*next(iter(sources.values())))
        http_port, metrics_port = free_port(), free_port()
        ray.init(
            address="local",  # always a new instance of its own, never one found on the machine (`ray start`)
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            namespace="lorafleet-loadtest",
            log_to_driver=False,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
        )
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(config), name="lorafleet", route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(url)
        name = next(iter(listed_model_sources(url, token)))
        sources = {name if key is None else key: value for key, value in sources.items()}
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        return cls(url, metrics_url, token, model_dir, name, apps=["lorafleet"], model_sources=sources)

    def start_baseline(self, adapters: dict[str, Path], torch_threads: int | None = None) -> str:
        from ray import serve

        from .baseline import baseline_app

        serve.run(
            baseline_app(self.model_dir, adapters, self.model_name, torch_threads),
            name="baseline",
            route_prefix="/baseline",
        )
        self.apps.append("baseline")
        self.baseline_url = self.url + "/baseline"
        return self.baseline_url

    def replicas(self) -> dict[str, int]:
        """Running replicas per ``app/deployment`` (from the Serve controller)."""
        from ray import serve

        out = {}
        for app_name, app in serve.status().applications.items():
            for dep_name, dep in app.deployments.items():
                out[f"{app_name}/{dep_name}"] = int(dep.replica_states.get("RUNNING", 0))
        return out

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# -- metrics -----------------------------------------------------------------------------------------

# What the sampler keeps from each scrape: series name -> labels whose values are kept apart ("/"-joined; the
# rest are summed over).
SAMPLED: dict[str, tuple[str, ...]] = {
    "ray_lorafleet_requests_total": ("status",),
    "ray_lorafleet_images_total": (),
    "ray_lorafleet_adapter_requests_total": ("outcome",),
    "ray_lorafleet_adapter_evictions_total": (),
    "ray_lorafleet_queue_depth_images": (),
    "ray_lorafleet_active_images": (),
    "ray_lorafleet_pending_denoise_steps": (),
    "ray_lorafleet_adapter_slots_used": (),
    # histograms: one entry per sample series (the many-adapters scenario's loads/s and adapter waits)
    "ray_lorafleet_adapter_load_latency_ms_count": (),
    "ray_lorafleet_adapter_prefetches_total": (),
    "ray_lorafleet_adapter_wait_ms_bucket": ("le",),
    "ray_lorafleet_adapter_wait_ms_count": (),
    "ray_lorafleet_adapter_wait_ms_sum": (),
    "ray_serve_deployment_replica_healthy": ("application", "deployment"),
}


def scrape(metrics_url: str, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """One scrape, reduced to ``SAMPLED``: ``{series: {label value or "": sum}}``."""
    text = requests.get(metrics_url, timeout=timeout_s).text
    return reduce_families(text)


def reduce_families(text: str) -> dict[str, dict[str, float]]:
    # Ray's exposition is large (every Ray and Serve series, long labels); parsing only the lines of the
    # sampled series keeps the sampler cheap on a machine whose cores the load test is measuring.
    bases = tuple(name.removesuffix("_total") for name in SAMPLED)

    def keep(line: str) -> bool:
        if line.startswith("# "):  # "# HELP name ..." / "# TYPE name kind"
            parts = line.split(" ", 3)
            return len(parts) > 2 and parts[2].startswith(bases)
        return line.startswith(bases)

    lines = [line for line in text.splitlines() if keep(line)]
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for s in family.samples:
            if s.name not in SAMPLED:
                continue
            label = "/".join(s.labels.get(k, "") for k in SAMPLED[s.name])
            series = out.setdefault(s.name, {})
            series[label] = series.get(label, 0.0) + s.value
    return out


class MetricsSampler:
    """Scrapes Prometheus metrics (and, where given, replica counts) every ``interval_s`` in a thread.

    ``samples``: ``[{"t": wall-clock s, "metrics": {...}, "replicas": {...}}]``.
    """

    def __init__(self, metrics_url: str | None, interval_s: float = 2.0, replicas_fn=None):
        self.metrics_url = metrics_url
        self.interval_s = interval_s
        self.replicas_fn = replicas_fn
        self.samples: list[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> dict:
        entry: dict = {"t": time.time(), "metrics": {}, "replicas": {}}
        if self.metrics_url:
            try:
                entry["metrics"] = scrape(self.metrics_url)
            except requests.RequestException:
                self.errors += 1
        if self.replicas_fn is not None:
            try:
                entry["replicas"] = self.replicas_fn()
            except Exception:  # the controller can be briefly busy; a gap in the plot is fine
                self.errors += 1
        elif "ray_serve_deployment_replica_healthy" in entry["metrics"]:
            entry["replicas"] = {k: int(v) for k, v in entry["metrics"]["ray_serve_deployment_replica_healthy"].items()}
        self.samples.append(entry)
        return entry

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> MetricsSampler:
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.samples
