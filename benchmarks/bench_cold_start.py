"""Two base models in one app, one scaled to zero: what the cold start costs, and what the warm model sees meanwhile.

    PYTHONPATH=. python benchmarks/bench_cold_start.py [--config serve_config.multi.yaml] [--json out.json]

Starts a local Ray instance (127.0.0.1) and the app of ``--config`` (default ``serve_config.multi.yaml``:
tiny-sd warm, tiny-sdxl at ``min_replicas: 0``), then measures, in one run:

1. the app's start until ``/readyz`` answers 200 (the warm model's replicas only);
2. the warm model's latency alone (``--warm-requests`` sequential 64x64 requests, median);
3. the first request to the cold model: from sending it to its image (replica placement, process start,
   model build, the request itself), while the warm model is sent the same sequential requests; their
   median latency during the cold start against (2);
4. the cold model's latency once warm (median);
5. the resident memory of each replica process (``ps``), by deployment.

Ray's own start is not counted. Prints a Markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "seed": 1}


def post(url: str, body: dict) -> float:
    start = time.perf_counter()
    r = requests.post(url + "/v1/generate", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def replica_memory() -> dict[str, float]:
    """Resident GB per Serve replica process of the lorafleet app."""
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True, check=True).stdout
    memory = {}
    for line in out.splitlines()[1:]:
        rss, _, args = line.strip().partition(" ")
        if "ServeReplica:lorafleet:" in args:
            name = args.split("ServeReplica:lorafleet:")[1].split()[0].split(".")[0]
            memory[name] = round(int(rss) / 1024 / 1024, 2)
    return memory


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "serve_config.multi.yaml"))
    p.add_argument("--warm-requests", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import ray
    from ray import serve

    from graph.app import build_app
    from graph.config import AppConfig, load_serve_config

    _, app_args = load_serve_config(args.config)
    config = AppConfig.load(app_args)
    warm, cold = (s.name for s in config.served_models()[:2])
    port = 8765
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        serve.run(build_app(config), name="lorafleet", route_prefix="/")
        while requests.get(url + "/readyz", timeout=30).status_code != 200:
            time.sleep(0.5)
        app_start_s = time.perf_counter() - start
        memory_before = replica_memory()

        post(url, {**BODY, "model": warm})  # first-request costs (caches, kernels' shape checks)
        alone = [post(url, {**BODY, "model": warm}) for _ in range(args.warm_requests)]

        during: list[float] = []
        cold_s: list[float] = []
        thread = threading.Thread(target=lambda: cold_s.append(post(url, {**BODY, "model": cold})))
        thread.start()
        while thread.is_alive():
            during.append(post(url, {**BODY, "model": warm}))
        thread.join()
        cold_warm = [post(url, {**BODY, "model": cold}) for _ in range(args.warm_requests)]
        memory_after = replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()

    figures = {
        "config": os.path.relpath(args.config, ROOT),
        "models": [warm, cold],
        "app_start_s": round(app_start_s, 1),
        "warm_alone_p50_ms": round(1000 * statistics.median(alone), 1),
        "cold_first_request_s": round(cold_s[0], 1),
        "warm_during_cold_start_p50_ms": round(1000 * statistics.median(during), 1),
        "warm_during_cold_start_max_ms": round(1000 * max(during), 1),
        "warm_requests_during_cold_start": len(during),
        "cold_once_warm_p50_ms": round(1000 * statistics.median(cold_warm), 1),
        "replica_memory_gb_idle": memory_before,
        "replica_memory_gb_both_up": memory_after,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(figures, indent=2))
    print(
        f"\n| app start | {warm} alone p50 | {cold} first request (cold) | {warm} p50 during it | {cold} warm p50 |\n"
        f"|---:|---:|---:|---:|---:|\n"
        f"| {figures['app_start_s']} s | {figures['warm_alone_p50_ms']} ms | {figures['cold_first_request_s']} s | "
        f"{figures['warm_during_cold_start_p50_ms']} ms (max {figures['warm_during_cold_start_max_ms']}) | "
        f"{figures['cold_once_warm_p50_ms']} ms |"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
