"""Registry at scale: listing pages, name -> latest version, manifest caching, registrations per second.

Registers ``--adapters`` (default 10,000) small adapters into (a) a local-directory
store and (b) moto's S3 server on 127.0.0.1, started in this process. Every adapter
goes through ``Registry.register`` (validation, conversion, staging upload, blob
copy, manifest by conditional create): a diffusers-format LoRA file for the
``builtin:tiny-sd`` model, rank 2 on the UNet's ``attn1.to_q`` projections (5
modules, 4.6 KB), each with one different weight so every adapter has its own
blob. Names are ``<word>-<number>`` over 16 words (``ink-00042``), so listing
pages also meet the names whose keys sort out of name order (see
``lora_registry.listing``).

Then it measures, with a fresh ``Registry`` (empty caches) for "cold":

* a listing page (``limit=50``), the first and one in the middle: cold (manifests
  not cached), warm (listing re-read from the store, manifests cached: every
  ``manifest_ttl_s``), and cached (within ``manifest_ttl_s``: no store call);
* ``resolve("name")`` and ``resolve("name@v")``: cold (one listing of the name's
  prefix and one manifest GET), warm (``manifest_ttl_s`` expired: the listing of the
  name's prefix again, manifest cached), cached (within ``manifest_ttl_s``);
* registrations per second at full size, 1 and 4 threads (new versions of
  existing names), besides the rate of the initial load (4 threads, 0 -> N);
* store calls and keys read per operation, and, for scale, one full listing of
  ``adapters/`` (what ``Registry.list`` did on every ``manifest_ttl_s`` before).

    .venv/bin/python benchmarks/bench_registry_scale.py [--adapters 10000] [--quick] [--stores local,s3]

Prints Markdown tables and the machine it ran on. moto runs in this process, on
the same cores and under the same GIL as the client, and answers every
ListObjectsV2 by walking and sorting the whole bucket, so S3 listing figures here
grow with the bucket; AWS S3 does not. moto's requests run one at a time here
(``SerialMotoServer``): its bucket is a plain dict that a listing walks while
another request's PUT or DELETE changes it (a 500, ``KeyError`` in
``list_objects``), which 4 registering threads on 10,000 adapters hit constantly.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_registry import DiskCache, Registry, base_model_spec_from_configs, layout, open_store  # noqa: E402
from lora_registry.stores import Store  # noqa: E402

CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
WORDS = [
    "ink", "pastel", "pixel", "watercolor", "charcoal", "neon", "anime", "oil",
    "sketch", "retro", "clay", "glass", "paper", "noir", "vapor", "mosaic",
]  # fmt: skip
PAGE_LIMIT = 50
LOAD_THREADS = 4


def serial_moto_server(port: int):
    """moto's ``ThreadedMotoServer``, one request at a time (its in-memory bucket is not safe to list during a
    write). Under one GIL with the client, little concurrency is lost."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:  # moto's own, with the app behind a lock
            app = DomainDispatcherApplication(create_backend_app)
            lock = threading.Lock()

            def serial(environ, start_response):
                with lock:
                    return list(app(environ, start_response))  # the whole body, inside the lock

            self._server = make_server(self._ip_address, self._port, serial, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerialMotoServer(ip_address="127.0.0.1", port=port, verbose=False)


def adapter_name(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]}-{i:05d}"


class Payloads:
    """Distinct small LoRA files: one random state, with one weight changed per adapter (a distinct sha256)."""

    def __init__(self, spec, rank: int = 2):
        g = torch.Generator().manual_seed(0)
        self.state = {}
        for name, shape in sorted(spec.modules.items()):
            if name.startswith("unet.") and name.endswith(".attn1.to_q"):
                self.state[f"{name}.lora_A.weight"] = torch.randn(shape.lora_a_shape(rank), generator=g) * 0.1
                self.state[f"{name}.lora_B.weight"] = torch.randn(shape.lora_b_shape(rank), generator=g) * 0.1
        self.first = sorted(self.state)[0]
        self.modules = len(self.state) // 2

    def __call__(self, i: int) -> bytes:
        a = self.state[self.first].clone()
        a.view(-1)[0] = 1.0 + i * 1e-6
        return safetensors.torch.save({**self.state, self.first: a})


class CountingStore(Store):
    """Counts the calls and listed keys an operation costs (the benchmark's "store calls" column)."""

    def __init__(self, inner: Store):
        self.inner, self.uri = inner, inner.uri
        self.lists = self.keys = self.gets = self.other = 0

    def reset(self) -> None:
        self.lists = self.keys = self.gets = self.other = 0

    def summary(self) -> str:
        parts = [f"{self.lists} LIST ({self.keys} keys)" if self.lists else "", f"{self.gets} GET" if self.gets else ""]
        return ", ".join(p for p in parts if p) or "none"

    def list(self, prefix, start_after=None):
        self.lists += 1
        for obj in self.inner.list(prefix, start_after=start_after):
            self.keys += 1
            yield obj

    def get_bytes(self, key):
        self.gets += 1
        return self.inner.get_bytes(key)

    def put_bytes(self, key, data, progress=None):
        self.other += 1
        return self.inner.put_bytes(key, data, progress)

    def put_if_absent(self, key, data):
        self.other += 1
        return self.inner.put_if_absent(key, data)

    def download(self, key, dest, progress=None):
        self.other += 1
        return self.inner.download(key, dest, progress)

    def copy(self, src, dst):
        self.other += 1
        return self.inner.copy(src, dst)

    def delete(self, key):
        self.other += 1
        return self.inner.delete(key)

    def head(self, key):
        self.other += 1
        return self.inner.head(key)


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0]
    return statistics.median(samples_ms), statistics.quantiles(samples_ms, n=20, method="inclusive")[18]


def timed(fn: Callable[[int], object], reps: int, before: Callable[[int], None] | None = None) -> list[float]:
    out = []
    for i in range(reps):
        if before is not None:
            before(i)
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def register_all(registry: Registry, payloads: Payloads, jobs: list[tuple[str, int]], threads: int) -> float:
    """Register ``jobs`` (name, payload seed) over ``threads`` threads; returns registrations per second."""
    start_line = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    done = [0]

    def run(part: list[tuple[str, int]]) -> None:
        start_line.wait()
        try:
            for name, seed in part:
                registry.register(payloads(seed), name=name)
                done[0] += 1
                if done[0] % 1000 == 0:
                    print(f"  {done[0]} registered", file=sys.stderr, flush=True)
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(jobs[t::threads],)) for t in range(threads)]
    for w in workers:
        w.start()
    start_line.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(jobs) / elapsed


@dataclass
class StoreResult:
    label: str
    load_s: float = 0.0
    load_rate: float = 0.0
    rates: dict[int, float] = field(default_factory=dict)
    rows: list[tuple[str, str, float, float, str]] = field(default_factory=list)  # op, state, p50, p95, calls
    full_scan_ms: float = 0.0
    full_scan_keys: int = 0
    floor: list[tuple[str, float, float]] = field(default_factory=list)  # raw store request, p50, p95


def measure(
    result: StoreResult,
    op: str,
    fresh: Callable[[float], tuple[Registry, CountingStore]],
    call: Callable[[Registry, int], object],
    args,
) -> None:
    """Rows for ``op`` cold (a new node per repetition), warm (TTL 0: store listed each time, manifests cached)
    and cached (within the TTL). ``call(registry, i)`` runs repetition ``i``."""

    def calls(registry: Registry, counting: CountingStore) -> str:
        counting.reset()
        call(registry, 0)
        return counting.summary()

    def add(state: str, samples: list[float], store_calls: str) -> None:
        p50, p95 = percentiles(samples)
        result.rows.append((op, state, p50, p95, store_calls))

    nodes: list[Registry] = []
    cold = timed(lambda i: call(nodes[-1], i), args.cold_reps, before=lambda i: nodes.append(fresh(0.0)[0]))
    add("cold", cold, calls(*fresh(0.0)))
    for ttl_s, state in ((0.0, "warm (TTL expired)"), (3600.0, "cached (within TTL)")):
        registry, counting = fresh(ttl_s)
        for i in range(args.reps):
            call(registry, i)  # fills the manifest cache (and, within the TTL, the listing)
        add(state, timed(lambda i, r=registry: call(r, i), args.reps), calls(registry, counting))


def bench_store(label: str, store: Store, spec, payloads: Payloads, args, work: Path) -> StoreResult:
    result = StoreResult(label)
    n = args.adapters
    rng = random.Random(0)
    writer = Registry(store, base=spec)  # as the CLI registers: no caches

    t0 = time.perf_counter()
    result.load_rate = register_all(writer, payloads, [(adapter_name(i), i) for i in range(n)], LOAD_THREADS)
    result.load_s = time.perf_counter() - t0
    print(f"[{label}] registered {n} adapters in {result.load_s:.0f} s ({result.load_rate:.1f}/s)", file=sys.stderr)

    # Registrations at full size: new versions of existing names, disjoint per run.
    again = rng.sample(range(n), 2 * args.registrations)
    for threads, picks in ((1, again[: args.registrations]), (4, again[args.registrations :])):
        result.rates[threads] = register_all(writer, payloads, [(adapter_name(i), n + i) for i in picks], threads)
    latest = {adapter_name(i): 2 for i in again}
    print(f"[{label}] registrations/s at full size: {result.rates}", file=sys.stderr)

    names = sorted(adapter_name(i) for i in range(n))
    middle = names[len(names) // 2]
    cold_dir = work / f"cold-{label.split()[0]}"

    def fresh(ttl_s: float) -> tuple[Registry, CountingStore]:
        """A replica's registry (disk cache, where manifests are kept too), with empty caches; same store client."""
        shutil.rmtree(cold_dir, ignore_errors=True)
        counting = CountingStore(store)
        return Registry(counting, base=spec, cache=DiskCache(cold_dir, 1 << 30), manifest_ttl_s=ttl_s), counting

    for where, after in (("first page", None), (f"middle page (after `{middle}`)", middle)):
        measure(
            result,
            f"`list(limit={PAGE_LIMIT})`, {where}",
            fresh,
            lambda registry, i, after=after: registry.list(limit=PAGE_LIMIT, after=after),
            args,
        )
    picks = [names[rng.randrange(n)] for _ in range(max(args.reps, args.cold_reps))]
    measure(result, '`resolve("name")` (latest)', fresh, lambda registry, i: registry.resolve(picks[i]), args)
    measure(
        result,
        '`resolve("name@v")`',
        fresh,
        lambda registry, i: registry.resolve(f"{picks[i]}@{latest.get(picks[i], 1)}"),
        args,
    )
    print(f"[{label}] latencies measured", file=sys.stderr)

    # For scale: one full listing of adapters/ (the old Registry.list, every manifest_ttl_s).
    t0 = time.perf_counter()
    result.full_scan_keys = sum(1 for _ in store.list(layout.ADAPTERS_PREFIX))
    result.full_scan_ms = (time.perf_counter() - t0) * 1000

    # The store's own cost per request at this size (no registry code): what the rows above are built from.
    some = names[: args.reps]
    for what, fn in (
        ("LIST of one name's prefix (1 key)", lambda i: list(store.list(layout.name_prefix(some[i])))),
        (
            f"LIST of `adapters/` from the middle, first {PAGE_LIMIT + 5} keys",
            lambda i: list(islice(store.list(layout.ADAPTERS_PREFIX, f"adapters/{middle}"), PAGE_LIMIT + 5)),
        ),
        ("GET of one manifest", lambda i: store.get_bytes(layout.manifest_key(some[i], 1))),
    ):
        result.floor.append((what, *percentiles(timed(fn, args.reps))))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10_000, help="adapters registered per store")
    parser.add_argument("--quick", action="store_true", help="a small run: 300 adapters, fewer repetitions")
    parser.add_argument("--stores", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--reps", type=int, default=200, help="repetitions of warm / cached measurements")
    parser.add_argument("--cold-reps", type=int, default=30, help="repetitions of cold measurements")
    parser.add_argument("--registrations", type=int, default=200, help="registrations per rate measurement")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.reps, args.cold_reps, args.registrations = 300, 30, 5, 20
    if args.adapters < 2 * args.registrations or args.adapters < 2:
        parser.error("--adapters must be at least twice --registrations")
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"local", "s3"}:
        parser.error(f"--stores: local and/or s3, got {args.stores!r}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    from deployments.engine.builtin import TINY_SD

    spec = base_model_spec_from_configs(TINY_SD["unet"], TINY_SD["text_encoder"], family="sd1")
    payloads = Payloads(spec)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-scale-"))
    server = None
    results = []
    started = time.perf_counter()
    try:
        for kind in stores:
            if kind == "local":
                results.append(bench_store("local dir", open_store(str(work / "store")), spec, payloads, args, work))
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                server = serial_moto_server(port)
                server.start()
                endpoint = f"http://127.0.0.1:{port}"
                import boto3

                boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS).create_bucket(Bucket="bench")
                s3 = open_store("s3://bench/lorafleet", endpoint_url=endpoint, **CREDENTIALS)
                results.append(bench_store("S3 (moto)", s3, spec, payloads, args, work))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    wall_s = time.perf_counter() - started

    size = len(payloads(0))
    print(f"## Registry at scale: {args.adapters:,} adapters\n")
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. S3 is moto's server in the same process over loopback, "
        "one request at a time. "
        f"Adapters: `builtin:tiny-sd`, rank 2 on {payloads.modules} `attn1.to_q` modules, {size / 1e3:.1f} KB "
        f"each, every one registered through `Registry.register`. Wall time {wall_s / 60:.1f} min.\n"
    )
    print(f"### Latency ({args.reps} warm / cached repetitions, {args.cold_reps} cold, random names)\n")
    print("| store | operation | state | p50 ms | p95 ms | store calls |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for r in results:
        for op, state, p50, p95, calls in r.rows:
            print(f"| {r.label} | {op} | {state} | {p50:.3f} | {p95:.3f} | {calls} |")
    print("\n### Registrations per second\n")
    print(f"| store | initial load, {LOAD_THREADS} threads, 0 -> {args.adapters:,} | 1 thread at full size | "
          "4 threads at full size |")  # fmt: skip
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r.label} | {r.load_rate:.1f} ({r.load_s:.0f} s) | {r.rates[1]:.1f} | {r.rates[4]:.1f} |")
    print("\n### For scale: one full listing of `adapters/` (what `list()` did every `manifest_ttl_s` before)\n")
    print("| store | keys | ms |")
    print("| --- | ---: | ---: |")
    for r in results:
        print(f"| {r.label} | {r.full_scan_keys:,} | {r.full_scan_ms:.0f} |")
    print(f"\n### The stores' own request costs at {args.adapters:,} adapters (`Store` calls, no registry code)\n")
    print("| store | request | p50 ms | p95 ms |")
    print("| --- | --- | ---: | ---: |")
    for r in results:
        for what, p50, p95 in r.floor:
            print(f"| {r.label} | {what} | {p50:.3f} | {p95:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
