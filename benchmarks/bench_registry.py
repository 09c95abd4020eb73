"""Registry benchmark: adapter fetch latency (cold from S3, disk cache, memory) and registrations per second.

Runs against moto's S3 server on 127.0.0.1 (in this process) and a local-directory
store, with an SD1.5-size base model spec (built on the meta device: no weights)
and a rank-16 random LoRA on the UNet's attention projections (to_q, to_k, to_v,
to_out.0), float16 — the size of a typical Civitai SD1.5 style LoRA.

    .venv/bin/python benchmarks/bench_registry.py [--reps 20]

Prints a Markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_registry import DiskCache, MemoryCache, Registry, base_model_spec_from_configs, open_store  # noqa: E402

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
CLIP_VIT_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}


def random_lora_bytes(spec, rank: int, targets, seed: int) -> bytes:
    """diffusers-style LoRA file with random float16 weights on the UNet modules ending in ``targets``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(spec.modules.items()):
        if name.startswith("unet.") and name.endswith(tuple("." + t for t in targets)):
            state[f"{name}.lora_A.weight"] = (torch.randn(shape.lora_a_shape(rank), generator=g) * 0.01).half()
            state[f"{name}.lora_B.weight"] = (torch.randn(shape.lora_b_shape(rank), generator=g) * 0.01).half()
    return safetensors.torch.save(state)


def timed(fn, reps: int, before=None) -> list[float]:
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def summary(samples_ms: list[float]) -> tuple[float, float]:
    p95 = statistics.quantiles(samples_ms, n=20, method="inclusive")[18] if len(samples_ms) > 1 else samples_ms[0]
    return statistics.median(samples_ms), p95


def fetch_rows(label: str, store_factory, spec, data: bytes, reps: int, work: Path) -> list[tuple]:
    writer = Registry(store_factory(), base=spec)
    manifest = writer.register(data, name="bench-style")
    cache_dir = work / f"cache-{label}"

    def fresh_node() -> Registry:
        return Registry(store_factory(), base=spec, cache=DiskCache(cache_dir, 10 << 30), memory=MemoryCache(4 << 30))

    def clear_disk():
        shutil.rmtree(cache_dir, ignore_errors=True)

    # Cold: a new replica with empty disk and memory caches (listing, manifest GET, blob GET, sha256, parse).
    nodes = []
    cold = timed(lambda: nodes[-1].load("bench-style"), reps, before=lambda: (clear_disk(), nodes.append(fresh_node())))
    node = nodes[-1]
    disk = timed(lambda: node.load("bench-style"), reps, before=node.memory.clear)
    memory = timed(lambda: node.load("bench-style"), reps)
    size_mb = manifest.size_bytes / 1e6
    return [
        (f"{label}: cold (empty disk + memory cache)", size_mb, *summary(cold)),
        (f"{label}: disk cache (memory cleared)", size_mb, *summary(disk)),
        (f"{label}: memory cache", size_mb, *summary(memory)),
    ]


def registrations_per_s(store_factory, spec, count: int, threads: int, same_name: bool) -> float:
    registry = Registry(store_factory(), base=spec)
    payloads = [random_lora_bytes(spec, 4, ("attn1.to_q",), seed=100 + i) for i in range(count)]
    start_line = threading.Barrier(threads)
    per_thread = [payloads[i::threads] for i in range(threads)]

    def run(t: int):
        start_line.wait()
        for i, data in enumerate(per_thread[t]):
            registry.register(data, name="bench-reg" if same_name else f"bench-reg-{t}-{i}")

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--registrations", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS).create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        import diffusers  # noqa: F401  (import time is not the spec's)
        import transformers  # noqa: F401

        t0 = time.perf_counter()
        spec = base_model_spec_from_configs(SD15_UNET, CLIP_VIT_L_TEXT, family="sd1")
        spec_s = time.perf_counter() - t0
        data = random_lora_bytes(spec, 16, ATTENTION, seed=0)
        n_modules = sum(
            1 for n in spec.modules if n.startswith("unet.") and n.endswith(tuple("." + t for t in ATTENTION))
        )

        def s3():
            return open_store("s3://bench/lorafleet", endpoint_url=endpoint, **CREDENTIALS)

        def local():
            return open_store(str(work / "store"))

        rows = fetch_rows("S3 (moto)", s3, spec, data, args.reps, work)
        rows += fetch_rows("local dir", local, spec, data, args.reps, work)

        t0 = time.perf_counter()
        Registry(s3(), base=spec).register(data, name="bench-one")
        register_one_ms = (time.perf_counter() - t0) * 1000

        reg_rows = []
        for label, factory in (("S3 (moto)", s3), ("local dir", local)):
            for threads, same in ((1, True), (4, False), (4, True)):
                rate = registrations_per_s(factory, spec, args.registrations, threads, same)
                what = (
                    "one name (versions race)" if same and threads > 1 else ("one name" if same else "distinct names")
                )
                reg_rows.append((label, threads, what, rate))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("## lora_registry benchmark\n")
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}. S3 is moto's server in the same process "
        "over loopback (so S3 numbers include moto's own CPU time on the same cores)."
    )
    print(
        f"\nAdapter: SD1.5 UNet, rank 16, {n_modules} attention modules (to_q/to_k/to_v/to_out.0), float16; "
        f"upload {len(data) / 1e6:.2f} MB. SD1.5 spec from configs on the meta device: {spec_s * 1000:.0f} ms.\n"
    )
    print(f"### `Registry.load(ref)` latency, {args.reps} repetitions\n")
    print("| source | canonical MB | median ms | p95 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, mb, median, p95 in rows:
        print(f"| {label} | {mb:.2f} | {median:.3f} | {p95:.3f} |")
    print(
        f"\n### Registrations ({args.registrations} small rank-4 adapters each: "
        "validate + convert + upload + manifest)\n"
    )
    print("| store | threads | names | registrations / s |")
    print("| --- | ---: | --- | ---: |")
    for label, threads, what, rate in reg_rows:
        print(f"| {label} | {threads} | {what} | {rate:.1f} |")
    print(
        f"\nOne registration of the {len(data) / 1e6:.1f} MB adapter to S3 "
        f"(validate, convert, stage, copy, manifest): {register_one_ms:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
