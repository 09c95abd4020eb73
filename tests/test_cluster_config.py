"""The cluster and operations files validate against the schemas of the tools that read them: Ray's
cluster-launcher schema, Ray Serve's deploy schema and lorafleet's own AppConfig, KubeRay's
RayService shape, Prometheus' scrape config, and a Grafana dashboard whose every query names a
metric that exists (deployments/metrics.py, Ray Serve's source)."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest
import ray
import tomllib
import yaml

from graph.config import AppConfig

from conftest import ROOT


def load(path: str):
    return yaml.safe_load((ROOT / path).read_text())


def locked(name: str) -> str:
    """requirements.lock's version of ``name``."""
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    return version


def app_args(doc: dict) -> dict:
    return doc["applications"][0]["args"]


# ---- Serve configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.multi.yaml", "autoscale/serve_config.fake.yaml"],
)
def test_serve_config_validates_with_serve_and_lorafleet(path):
    from ray.serve.schema import ServeDeploySchema

    doc = load(path)
    schema = ServeDeploySchema.model_validate(doc)
    assert [a.import_path for a in schema.applications] == ["graph.app:build_app"]
    config = AppConfig.load(app_args(doc))  # ConfigError names any bad field
    assert config.denoiser.autoscaling is not None
    assert config.denoiser.autoscaling["policy"]["policy_function"] == "deployments.autoscaling:PendingWorkPolicy"
    for served in config.served_models():  # each model's merged sections keep the policy
        assert served.denoiser.autoscaling["policy"]["policy_function"] == "deployments.autoscaling:PendingWorkPolicy"


def test_the_multi_model_example_scales_its_second_model_from_zero():
    sd, xl = AppConfig.load(app_args(load("serve_config.multi.yaml"))).served_models()
    assert (sd.name, xl.name) == ("tiny-sd", "tiny-sdxl")
    assert [s.autoscaling["min_replicas"] for s in (sd.text_encoder, sd.denoiser, sd.vae)] == [1, 1, 1]
    assert [s.autoscaling["min_replicas"] for s in (xl.text_encoder, xl.denoiser, xl.vae)] == [0, 0, 0]


# The knobs serve_config.gpu.yaml may change (marked "GPU:" in the file); everything else must match
# serve_config.yaml, so that the CPU default and the GPU cluster run the same application.
GPU_KNOBS = {
    "proxy_location",
    "http_options.host",
    "args.ingress.num_cpus",
    "args.text_encoder.num_gpus",
    "args.text_encoder.autoscaling.max_replicas",
    "args.denoiser.num_gpus",
    "args.denoiser.autoscaling.max_replicas",
    "args.denoiser.max_rows_per_tick",
    "args.denoiser.protected_tick_rows",  # CPU 4 (measured, docs/benchmarks.md #21); GPU 0 until measured there
    "args.lora.max_loras_per_replica",  # the GPU's memory holds ~1,000 rank-16 adapters, the CPU's ~39
    "args.vae.num_gpus",
    "args.vae.autoscaling.max_replicas",
    "args.registry.uri",
    "args.registry.s3_region",
}


def flatten(doc: dict) -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; the application's fields sit at the top level, its args under "args."."""
    app = doc["applications"][0]
    top = {k: v for k, v in doc.items() if k != "applications"}
    top.update({k: v for k, v in app.items() if k != "args"})
    out: dict[str, object] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", top)
    walk("args", app["args"])
    return out


def test_gpu_config_differs_from_the_default_only_in_gpu_scale_and_registry_knobs():
    cpu, gpu = flatten(load("serve_config.yaml")), flatten(load("serve_config.gpu.yaml"))
    changed = {k for k in cpu.keys() | gpu.keys() if cpu.get(k, "<absent>") != gpu.get(k, "<absent>")}
    assert changed <= GPU_KNOBS, sorted(changed - GPU_KNOBS)
    assert changed == GPU_KNOBS, sorted(GPU_KNOBS - changed)  # every GPU knob is really set

    config = AppConfig.load(app_args(load("serve_config.gpu.yaml")))
    assert config.denoiser.num_gpus == 1
    assert 0 < config.text_encoder.num_gpus < 1 and 0 < config.vae.num_gpus < 1
    assert config.registry.uri.startswith("s3://")
    default = AppConfig.load(app_args(load("serve_config.yaml")))
    assert config.denoiser.autoscaling["max_replicas"] > default.denoiser.autoscaling["max_replicas"]


# ---- Ray cluster launcher ------------------------------------------------------------------------------


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    jsonschema.validate(raw, ray_schema())
    validate_config(prepare_config(copy.deepcopy(raw)))  # with the AWS defaults merged in, as `ray up` does

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head.get("max_workers", 0) == 0  # runs no replica
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())
    assert all(t["resources"]["GPU"] >= 1 for t in workers.values())
    instance = {name: t["node_config"]["InstanceType"] for name, t in workers.items()}
    assert {"g5", "g6e", "p5"} <= {i.split(".")[0] for i in instance.values()}  # A10G, L40S, H100
    market = {name: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for name, t in workers.items()}
    spot = [workers[name] for name, kind in market.items() if kind == "spot"]
    assert spot and spot[0]["node_config"]["InstanceType"].startswith("g5")
    assert raw["idle_timeout_minutes"] > 0

    # Every node installs the locked set: lorafleet with each runtime dependency at requirements.lock's
    # version, torch in a CUDA build of the locked version, by the uv that writes the lock, on CPython 3.11.
    setup = "\n".join(raw["setup_commands"])
    assert re.search(
        r"uv pip install --python ~/venv/bin/python -q\s+-c requirements\.lock --torch-backend cu\d+ -e \.", setup
    )
    assert f"https://astral.sh/uv/{locked('uv')}/install.sh" in setup and "uv venv --seed --python 3.11" in setup
    assert "open_clip" not in setup and "torch==" not in setup  # the vocabulary is package data; torch: the lock
    assert ".venv" in raw["rsync_exclude"]  # the local CPU venv never reaches the cluster
    assert any("--autoscaling-config" in c for c in raw["head_start_ray_commands"])


def test_fake_cluster_config_is_complete_for_rays_schema():
    """The ray wheel ships no fake_multi_node/example.yaml to merge defaults from: the file stands alone."""
    import jsonschema
    from ray.autoscaler._private.util import fill_node_type_min_max_workers, validate_config

    raw = load("autoscale/fake_cluster.yaml")
    jsonschema.validate(raw, ray_schema())
    validate_config(raw)
    fill_node_type_min_max_workers(raw)
    assert raw["provider"]["type"] == "fake_multinode" and raw["provider"]["use_node_id_as_ip"] is True
    worker = raw["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] == 1 and worker["min_workers"] == 0
    assert raw["available_node_types"][raw["head_node_type"]]["resources"]["GPU"] == 0
    fake = AppConfig.load(app_args(load("autoscale/serve_config.fake.yaml")))
    assert fake.denoiser.num_gpus == 1 and fake.denoiser.autoscaling["max_replicas"] == worker["max_workers"]


# ---- KubeRay -------------------------------------------------------------------------------------------


def test_rayservice_carries_the_gpu_serve_config_and_an_autoscaling_gpu_group():
    doc = load("k8s/rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == load("serve_config.gpu.yaml")

    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ == locked("ray")
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (container,) = group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"]
    max_replicas = AppConfig.load(app_args(load("serve_config.gpu.yaml"))).denoiser.autoscaling["max_replicas"]
    assert group["maxReplicas"] == max_replicas  # one GPU pod per Denoiser replica at most
    images = {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]} | {container["image"]}
    assert len(images) == 1  # head and workers run the one image k8s/Dockerfile builds


def test_the_kuberay_image_installs_the_locked_set():
    lines = [ln for ln in (ROOT / "k8s" / "Dockerfile").read_text().splitlines() if not ln.startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.11[-\w.]*$", text, re.M)  # the lock's Python
    assert f"COPY --from=ghcr.io/astral-sh/uv:{locked('uv')} /uv" in text
    assert "COPY pyproject.toml requirements.lock" in text
    (install,) = [ln for ln in lines if "pip install" in ln]
    assert "uv pip install --system" in install and "-c requirements.lock --torch-backend ${TORCH_BACKEND} ." in install
    assert re.search(r"^ARG TORCH_BACKEND=cu\d+$", text, re.M) and "torch==" not in text
    # Every package the image installs is in the build context: pyproject's packages, none left out.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    assert copied == {p.rstrip("*") for p in packages["include"]}
    ignored = (ROOT / "k8s" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---- Prometheus and Grafana ----------------------------------------------------------------------------


def test_prometheus_scrapes_rays_service_discovery_file_and_static_targets():
    doc = load("docs/prometheus.yml")
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    files = [f for job in jobs.values() for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files
    targets = [t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)


def lorafleet_metric_names() -> set[str]:
    """The series Prometheus sees for every metric deployments/metrics.py defines (Ray adds `ray_`)."""
    tree = ast.parse((ROOT / "deployments" / "metrics.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            kind = node.func.id
            if kind in ("Counter", "Gauge", "Histogram") and node.args and isinstance(node.args[0], ast.Constant):
                base = "ray_" + node.args[0].value
                if kind == "Counter":
                    names.add(base if base.endswith("_total") else base + "_total")
                elif kind == "Gauge":
                    names.add(base)
                else:
                    names |= {base + "_bucket", base + "_sum", base + "_count"}
    return names


def ray_serve_metric_names() -> set[str]:
    """Ray Serve's metric names, read from its source (f-strings expanded for the http/grpc protocols)."""
    names: set[str] = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for name in re.findall(r"[\"'](serve_[a-z0-9_{}]+)[\"']", text):
            for protocol in ("http", "grpc"):
                names.add("ray_" + name.replace("{protocol_name}", protocol).replace("{protocol}", protocol))
    return {n + suffix for n in names for suffix in ("", "_total", "_bucket", "_sum", "_count")}


def dashboard_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_grafana_dashboard_queries_only_existing_metrics_and_covers_them():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))

    ours, serve = lorafleet_metric_names(), ray_serve_metric_names()
    assert "ray_lorafleet_requests_total" in ours and "ray_serve_deployment_replica_healthy" in serve
    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        for target in panel["targets"]:
            metrics = set(re.findall(r"\bray_[a-z0-9_]+", target["expr"]))
            assert metrics, (panel["title"], target["expr"])
            unknown = {m for m in metrics if m not in ours and m not in serve}
            assert not unknown, (panel["title"], unknown)
            used |= metrics
    # Every lorafleet metric family appears somewhere on the dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", m) for m in ours}
    shown = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert families <= shown, sorted(families - shown)
    assert any(m.startswith("ray_serve_") for m in used)
