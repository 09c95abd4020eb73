"""Served graph vs diffusers' StableDiffusionPipeline in a plain loop: same model, same machine, same run.

    python benchmarks/bench_serving.py [--size 64] [--steps 8] [--images 48] [--clients 4,8,16]

1. Baseline: ``StableDiffusionPipeline`` on the model directory, one image per
   call in a loop in this process: images/s and p50 latency.
2. lorafleet as shipped (serve_config.yaml's args) on a local Ray instance,
   through real HTTP on 127.0.0.1: p50 latency with one client, and images/s
   at saturation (the best over several client counts).
Prints a Markdown table with the ratios; paste it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p50(xs):
    return statistics.median(xs)


def baseline(model_dir: Path, size: int, steps: int, images: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def one(seed):
        t0 = time.perf_counter()
        pipe(
            f"a photo number {seed}",
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        )
        return time.perf_counter() - t0

    for s in range(3):
        one(s)
    start = time.perf_counter()
    lat = [one(s) for s in range(images)]
    wall = time.perf_counter() - start
    return {"images_per_s": images / wall, "p50_ms": 1000 * p50(lat), "threads": torch.get_num_threads()}


def served(size: int, steps: int, images: int, clients: list[int]) -> dict:
    import ray
    import requests
    from ray import serve

    from graph.app import build_app
    from graph.config import AppConfig, load_serve_config

    _, args = load_serve_config(ROOT / "serve_config.yaml")
    config = AppConfig.load(args)
    port = free_port()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="lorafleet", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/generate"
        session = requests.Session()

        def one(seed, s=session):
            body = {"prompt": f"a photo number {seed}", "width": size, "height": size, "steps": steps, "seed": seed}
            t0 = time.perf_counter()
            r = s.post(url, json=body, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["timings"]

        for s in range(5):
            one(s)
        single = [one(s) for s in range(images)]
        out = {
            "p50_ms": 1000 * p50([t for t, _ in single]),
            "stage_p50_ms": {k: p50([tm[k] for _, tm in single]) for k in single[0][1]},
            "saturation": {},
        }
        for c in clients:
            n = max(images, 4 * c)
            sessions = [requests.Session() for _ in range(c)]
            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(lambda i, ss=sessions, k=c: one(1000 + i, ss[i % k])[0], range(n)))
            wall = time.perf_counter() - start
            out["saturation"][c] = {"images_per_s": n / wall, "p50_ms": 1000 * p50(lat)}
        out["denoiser"] = serve.get_deployment_handle("Denoiser", "lorafleet").stats.remote().result()
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--clients", default="4,8,16")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    from deployments.engine.models import resolve_model_dir

    model_dir = resolve_model_dir("builtin:tiny-sd")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    base = baseline(model_dir, args.size, args.steps, args.images)
    print(f"baseline: {base}", flush=True)
    srv = served(args.size, args.steps, args.images, clients)
    print(f"served: {json.dumps(srv)}", flush=True)
    best_c, best = max(srv["saturation"].items(), key=lambda kv: kv[1]["images_per_s"])
    ratio = best["images_per_s"] / base["images_per_s"]
    overhead = srv["p50_ms"] - base["p50_ms"]
    print()
    print(f"builtin:tiny-sd, {args.size}x{args.size}, {args.steps} steps, guidance 7.5, default scheduler (PNDM)")
    print()
    print("| what | figure |")
    print("| --- | --- |")
    base_figure = f"{base['images_per_s']:.2f} img/s, p50 {base['p50_ms']:.0f} ms"
    print(f"| diffusers pipeline, plain loop, 1 image per call | {base_figure} |")
    for c, s in srv["saturation"].items():
        print(f"| lorafleet served, {c} concurrent clients | {s['images_per_s']:.2f} img/s, p50 {s['p50_ms']:.0f} ms |")
    print(
        f"| lorafleet served, 1 client | p50 {srv['p50_ms']:.0f} ms "
        f"(stages p50: " + ", ".join(f"{k} {v:.1f}" for k, v in srv["stage_p50_ms"].items()) + ") |"
    )
    what = f"**throughput ratio** (served at saturation, {best_c} clients / plain loop; target >= 1.0)"
    print(f"| {what} | **{ratio:.2f}x** |")
    print(f"| **one-client p50 latency overhead** (served - plain loop; target <= 60 ms) | **{overhead:+.0f} ms** |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"baseline": base, "served": srv, "ratio": ratio, "overhead_ms": overhead}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
