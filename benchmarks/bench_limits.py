"""Limits before work (issue 16, D4): what a 5 MB prompt costs the ingress, and whether a normal request
notices it. The real ingress app (graph/ingress.py) on the embedded model behind uvicorn on 127.0.0.1, the
denoising graph replaced by an instant fake: what is measured is the ingress's own work (parsing,
validation, tokenizing), which is where a huge prompt used to cost seconds. The fake graph answers after
``GRAPH_S`` (0.37 s, a normal request's latency on this machine in issue 16), so that the latency ratio
compares what the ingress adds against a realistic request. The clients sending 5 MB prompts are separate
processes (they would otherwise share the server's interpreter lock).

    python benchmarks/bench_limits.py [--seconds 10]

Prints, as a Markdown table for docs/benchmarks.md:
- the server time to refuse a 5 MB prompt: with the shipped caps (413 at limits.max_body_bytes, read up to
  the cap) and with the body cap raised so the prompt reaches validation (422 prompt_too_long before
  tokenizing); next to it, what tokenizing that prompt costs (what the server did before);
- a normal request's median latency alone, and while clients send 5 MB prompts back to back (the ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

PROMPT_BYTES = 5 * 1024 * 1024
GRAPH_S = 0.37
NORMAL = {"prompt": "a lighthouse at dusk, watercolor", "steps": 2, "width": 64, "height": 64}


def serve_in_thread(config) -> tuple[str, object, object]:
    """The real ingress app with ``config`` on a free loopback port; returns (url, server, ingress)."""
    import uvicorn
    from ray import serve

    from deployments.messages import DecodedImages
    from graph import ingress as ingress_module

    class FakeGraph:
        async def run(self, plan):
            await asyncio.sleep(GRAPH_S)  # the TextEncoder/Denoiser/VAE replicas' time: not the ingress's
            return DecodedImages(tuple(b"png" for _ in range(plan.num_images)), 0.0, 0.0, 0.0, 0.0)

    cls = ingress_module.Ingress.func_or_class.__bases__[0]
    ingress = cls.__new__(cls)
    cls.__init__(ingress, None, config, None)
    ingress.graph = FakeGraph()
    serve.get_replica_context = lambda: SimpleNamespace(servable_object=ingress)
    ingress_module.metrics = lambda: SimpleNamespace(  # no Ray: count nothing
        **{
            name: SimpleNamespace(inc=lambda *a, **k: None, observe=lambda *a, **k: None)
            for name in (
                "requests",
                "request_latency",
                "request_body_bytes",
                "stage_latency",
                "images",
                "replica_failures",
                "registry_ops",
                "registry_errors",
            )
        }
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ingress_module.app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, ingress


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - start)


def big_prompt_body() -> bytes:
    return b'{"steps": 2, "prompt": "' + b"a" * PROMPT_BYTES + b'"}'


def flood(url: str, stop) -> None:
    """A client sending 5 MB prompts back to back (its own process)."""
    session, body = requests.Session(), big_prompt_body()
    while not stop.is_set():
        try:
            session.post(url + "/v1/generate", data=body, headers={"content-type": "application/json"})
        except requests.ConnectionError:  # the server answered 413 and closed while the body was still going out
            session = requests.Session()


def measure(url: str, seconds: float) -> dict:
    session = requests.Session()
    body = big_prompt_body()
    headers = {"content-type": "application/json"}
    refusals = [timed_ms(lambda: session.post(url + "/v1/generate", data=body, headers=headers)) for _ in range(10)]
    status = session.post(url + "/v1/generate", data=body, headers=headers).status_code

    def normal_ms() -> float:
        return timed_ms(lambda: session.post(url + "/v1/generate", json=NORMAL).raise_for_status())

    for _ in range(5):  # warm-up
        normal_ms()
    alone = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alone.append(normal_ms())
    stop = multiprocessing.Event()
    floods = [multiprocessing.Process(target=flood, args=(url, stop)) for _ in range(2)]
    for p in floods:
        p.start()
    beside = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        beside.append(normal_ms())
    stop.set()
    for p in floods:
        p.join()
    return {
        "status": status,
        "refuse_ms": statistics.median(refusals),
        "alone_ms": statistics.median(alone),
        "beside_ms": statistics.median(beside),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency phase")
    args = parser.parse_args()

    from deployments.engine import models
    from deployments.engine.prompts import tokenize_weighted
    from graph.config import AppConfig

    cache = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    base = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache)},
        "registry": {"uri": str(cache / "registry"), "cache_dir": str(cache / "adapters")},
    }
    rows = []
    for label, limits in (
        ("shipped caps: 413 at limits.max_body_bytes (1 MiB)", {}),
        ("body cap 8 MiB: 422 at limits.max_prompt_chars", {"max_body_bytes": 8 << 20}),
    ):
        url, server, _ = serve_in_thread(AppConfig.load({**base, "limits": limits}))
        result = measure(url, args.seconds)
        server.should_exit = True
        rows.append((label, result))

    tokenizer = models.load_tokenizer(models.resolve_model_dir("builtin:tiny-sd", str(cache)))
    tokenize_ms = timed_ms(lambda: tokenize_weighted(tokenizer, "a " * (PROMPT_BYTES // 2)))

    print(
        "| 5 MB prompt | answer | refused in (median) | normal request alone | beside 2 clients sending 5 MB "
        "prompts | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(
            f"| {label} | {r['status']} | {r['refuse_ms']:.0f} ms | {r['alone_ms']:.1f} ms | {r['beside_ms']:.1f} ms "
            f"| {r['beside_ms'] / r['alone_ms']:.2f} |"
        )
    print(f"\nTokenizing that prompt (what the ingress did before the limits): {tokenize_ms:.0f} ms.")


if __name__ == "__main__":
    main()
