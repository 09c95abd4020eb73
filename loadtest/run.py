"""The load-test runner: ``make loadtest`` or ``python -m loadtest.run``.

    python -m loadtest.run                       # start lorafleet + the diffusers baseline locally, full run
    python -m loadtest.run --url http://127.0.0.1:8000 --admin-token $LORAFLEET_ADMIN_TOKEN \\
        --metrics-url http://127.0.0.1:8080/metrics --no-baseline     # a running cluster

Steps: start a cluster on 127.0.0.1 (or target ``--url``), generate ``--adapters``
synthetic LoRA files for the base model and register them, start the baseline
(one Ray Serve deployment around diffusers' pipeline, the same adapters loaded),
then, each in its own locust process (headless, bounded in time):

1. saturation search, the stages of lorafleet and of the baseline alternating
   (so background load on the machine biases neither): the highest offered
   rate whose p95 latency meets ``--slo-ms``;
2. fairness (issue 21's isolation check): a heavy tenant flooding at ``--overload`` times
   the target's capacity (the lowest rate at which it missed the SLO, or ``--capacity-rps``)
   and a light tenant offering ``--light-load`` of it, below its fair share (half at equal
   weights); then the light tenant alone at the same rate (``<target>-alone``), whose p95
   the report compares against its p95 under the flood (PASS: nothing of the light tenant's
   refused, p95 at most ``--isolation-ratio`` x alone);

sampling Prometheus metrics (and Serve's replica counts) all along, and writes
``report.md`` with PNG plots and ``summary.json`` into ``--out``. ``--stages``
replaces the search by fixed stages (the CI smoke test).

``--models tiny-sd=3,tiny-sdxl=1`` mixes base models: each request's model by weight,
``--adapters`` synthetic adapters per model built from that model's own architecture and
registered for it, warm-up requests on every model (waking one that scales from zero), and
per-model figures in the report; the baseline (one diffusers pipeline) is left out.

``--scenario many-adapters`` (``loadtest/many_adapters.py``): 200 adapters, the
search on that traffic (lorafleet only; ``--rate`` skips it), then one
``--scenario-s`` stage at ``--load-fraction`` of the sustainable rate, reported
by adapter popularity class. Traffic knobs go to
locust through ``--locust-args "--zipf-s 1.3 --sizes 64x64"`` or ``LOADTEST_*``
environment variables (see ``loadtest/locustfile.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    # Versions from package metadata: importing locust here would monkey-patch this (the Ray) process.
    versions = {}
    for dist in ("torch", "ray", "diffusers", "locust"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": None,
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": os.getloadavg(),
    }


def run_locust(
    host: str, out_dir: Path, plan_args: list[str], extra_args: list[str], timeout_s: float, env: dict | None = None
) -> dict:
    """One headless locust run in its own process; returns its stage log (``stages.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", host,
        "--csv", str(out_dir / "locust"), "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0",
        "--request-log", str(out_dir / "requests.jsonl"), "--stage-log", str(out_dir / "stages.json"),
        "--max-run-s", str(int(timeout_s)), *plan_args, *extra_args,
    ]  # fmt: skip
    print(f"  $ {' '.join(shlex.quote(c) for c in cmd[2:])}", flush=True)
    started = time.time()
    with open(out_dir / "locust.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}, text=True
        )
        try:
            rc = proc.wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise RuntimeError(
                f"locust did not finish in {timeout_s + 60:.0f} s; see {out_dir / 'locust.log'}"
            ) from None
    if rc != 0 or not (out_dir / "stages.json").exists():
        tail = (out_dir / "locust.log").read_text()[-3000:]
        raise RuntimeError(f"locust exited with {rc} after {time.time() - started:.0f} s:\n{tail}")
    return json.loads((out_dir / "stages.json").read_text())


def cluster_lora_config(config_path: Path) -> dict:
    """The ``lora`` section of a serve config (its slot budget), as deployed."""
    from graph.config import load_serve_config

    return dict(load_serve_config(config_path)[1].get("lora") or {})


def warm_up(url: str, model_name: str, adapters: list[str], n: int = 4, model: str | None = None) -> None:
    """A few sequential requests (both sizes of the default mix, an adapter) so first-call costs stay out.

    ``model``: the base model to warm (sent as ``model``; one that scales from zero is woken here, not in
    the measured stages); None: the server's default model, no ``model`` field. ``adapters``: that model's.
    """
    on_model = {} if model is None else {"model": model}
    bodies = [
        {"prompt": "warm up", "width": 64, "height": 64, "steps": 4, "seed": 1, **on_model},
        {"prompt": "warm up", "width": 64, "height": 96, "steps": 4, "seed": 2, "scheduler": "euler", **on_model},
    ]
    if adapters:
        bodies.append({"prompt": "warm up", "width": 64, "height": 64, "steps": 4, "seed": 3, **on_model,
                       "loras": [{"name": adapters[0], "scale": 1.0}], "scheduler": "dpmpp_2m"})  # fmt: skip
    what = url if model is None else f"{url} (model {model})"
    for i in range(n):
        r = requests.post(url + "/v1/generate", json=bodies[i % len(bodies)], timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request to {what} failed: HTTP {r.status_code}: {r.text[:300]}")
    r = requests.post(
        url + "/v1/images/generations",
        json={"model": model or model_name, "prompt": "warm up", "size": "64x64", "steps": 4, "seed": 4},
        timeout=300,
    )
    if r.status_code != 200:
        raise RuntimeError(f"warm-up request to {what} (OpenAI shape) failed: HTTP {r.status_code}: {r.text[:300]}")


def check_mix_served(mix: list[tuple[str, float]], served: list[str], url: str) -> None:
    """Raise ``SystemExit`` naming ``--models`` if the target does not serve a mixed model."""
    missing = [name for name, _ in mix if name not in served]
    if missing:
        raise SystemExit(f"error: --models: {', '.join(missing)} not served by {url} (served: {', '.join(served)})")


def model_dirs_for_mix(
    mix: list[tuple[str, float]], sources: dict[str, tuple[str | None, str | None]], url: str
) -> dict[str, Path]:
    """Each mixed model's local diffusers directory, from its URI (``sources``: name -> (uri, cache_dir),
    from the serve config or ``GET /v1/models``), to build its synthetic adapters from its own architecture.
    Raises ``SystemExit`` naming ``--models`` for a model the target does not serve or whose URI it hides."""
    from deployments.engine.models import resolve_model_dir

    check_mix_served(mix, list(sources), url)
    hidden = [name for name, _ in mix if sources[name][0] is None]
    if hidden:
        raise SystemExit(
            f"error: --models: {url}/v1/models gives no uri for {', '.join(hidden)}: pass the admin token "
            "(--admin-token or $LORAFLEET_ADMIN_TOKEN) to build their adapters"
        )
    return {name: resolve_model_dir(*sources[name]) for name, _ in mix}


def interleaved_search(targets: dict[str, str], out: Path, args, common: list[str], info: dict, sampler):
    """The saturation search on every target, one stage (one locust process) at a time, alternating targets.

    Alternating puts both targets' stages at a given step into the same minute of whatever else
    the machine is doing, so background load biases neither. Each target keeps its own
    ``SaturationSearch`` (the same rate ladder); its stages are merged into ``<target>-search/``.
    Returns (sustainable rate, lowest failing rate) per target.
    """
    from .stats import SaturationSearch

    searches = {
        name: SaturationSearch(args.start_rps, args.growth, args.resolution, args.max_stages, max_rps=args.max_rps)
        for name in targets
    }
    docs: dict[str, dict] = {}
    phases = {}
    for name in targets:
        phases[name] = {"name": f"{name}-search", "target": name, "dir": f"{name}-search"}
        info["phases"].append(phases[name])
    while True:
        ran = False
        for name, target in targets.items():
            rate = searches[name].next_rate()
            if rate is None:
                continue
            ran = True
            phase = phases[name]
            index = len(docs.get(name, {}).get("stages", []))
            print(f"[{phase['name']}] stage {index}: {rate:.2f} req/s on {target}", flush=True)
            phase.setdefault("start", time.time())
            stage_dir = out / phase["dir"] / f"stage-{index:02d}"
            log = run_locust(
                target,
                stage_dir,
                ["--plan", "stages", "--stages", f"{rate}:{args.stage_s}"],
                common,
                args.phase_timeout_s,
            )
            phase["end"] = time.time()
            (stage,) = log["stages"]
            stage["index"] = index
            searches[name].record(rate, stage["passed"])
            doc = docs.setdefault(name, {**log, "plan": "search", "stages": []})
            doc["stages"].append(stage)
            doc["sustainable_rps"] = searches[name].sustainable_rps
            x = stage["stats"]
            print(
                f"[{phase['name']}] stage {index}: {rate:.2f} req/s -> p95 {x['p95_ms'] or 0:.0f} ms, "
                f"{x['failed']} failed: {'meets' if stage['passed'] else 'misses'} the SLO",
                flush=True,
            )
            with open(out / phase["dir"] / "requests.jsonl", "a") as merged:
                merged.write((stage_dir / "requests.jsonl").read_text())
            (out / phase["dir"] / "stages.json").write_text(json.dumps(doc, indent=1))
            _write(out / "run.json", info, sampler)
        if not ran:
            break
    lowest_failing = {}
    for name, search in searches.items():
        lo = search.sustainable_rps
        failing = [r for r, ok in search.results if not ok and (lo is None or r > lo)]
        lowest_failing[name] = min(failing) if failing else None
        print(f"[{name}-search] sustainable: {lo} req/s at p95 <= {args.slo_ms:.0f} ms", flush=True)
    return {name: s.sustainable_rps for name, s in searches.items()}, lowest_failing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .traffic import models_option

    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    env = os.environ.get
    p.add_argument("--out", default=None, help="run directory (default .lorafleet/loadtest/<time>)")
    t = p.add_argument_group("target (default: start lorafleet and the baseline on a local Ray instance)")
    t.add_argument("--url", default=env("LOADTEST_URL"), help="a running lorafleet (only 127.0.0.1 is expected)")
    t.add_argument("--metrics-url", default=env("LOADTEST_METRICS_URL"), help="its Prometheus endpoint")
    t.add_argument("--admin-token", default=env("LORAFLEET_ADMIN_TOKEN"), help="to register the adapters")
    t.add_argument("--baseline-url", default=env("LOADTEST_BASELINE_URL"), help="a running baseline")
    t.add_argument("--model-uri", default="builtin:tiny-sd", help="base model of --url (for synthetic adapters)")
    t.add_argument(
        "--models",
        type=models_option,
        default=env("LOADTEST_MODELS", ""),
        help="base models, weighted: tiny-sd=3,tiny-sdxl=1 (adapters per model; default: no model field)",
    )
    t.add_argument("--config", default=str(ROOT / "serve_config.yaml"), help="serve config of the local cluster")
    t.add_argument("--baseline-torch-threads", type=int, default=None, help="torch threads of the baseline")
    w = p.add_argument_group("what to run")
    w.add_argument(
        "--scenario",
        choices=("default", "many-adapters"),
        default="default",
        help="default: search (+ baseline, fairness); many-adapters: issue 15's popular/rare adapters run",
    )
    w.add_argument("--adapters", type=int, default=None, help="synthetic adapters (20; many-adapters: 200)")
    w.add_argument("--adapter-rank", type=int, default=4)
    w.add_argument("--adapter-prefix", default=env("LOADTEST_ADAPTER_PREFIX", "lt-style-"))
    w.add_argument("--slo-ms", type=float, default=float(env("LOADTEST_SLO_MS", "1000")), help="p95 objective")
    w.add_argument("--stage-s", type=float, default=float(env("LOADTEST_STAGE_S", "12")))
    w.add_argument("--warmup-s", type=float, default=float(env("LOADTEST_WARMUP_S", "2")))
    w.add_argument("--start-rps", type=float, default=float(env("LOADTEST_START_RPS", "2")))
    w.add_argument("--growth", type=float, default=float(env("LOADTEST_GROWTH", "1.5")))
    w.add_argument("--max-stages", type=int, default=int(env("LOADTEST_MAX_STAGES", "7")), help="per target")
    w.add_argument("--resolution", type=float, default=0.15, help="search: stop within 1 + this of the limit")
    w.add_argument("--max-rps", type=float, default=200.0, help="search: highest rate tried")
    w.add_argument("--concurrency", type=int, default=int(env("LOADTEST_CONCURRENCY", "64")))
    w.add_argument("--stages", default=None, help="fixed stages RATE:SECONDS,... instead of the saturation search")
    w.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    w.add_argument("--no-fairness", action="store_true", help="skip the fairness run")
    w.add_argument(
        "--fairness-tenants",
        default=None,
        help="the fairness run's tenants and shares, its rate --overload x capacity (default: heavy at --overload "
        "x capacity, light at --light-load x capacity)",
    )
    w.add_argument(
        "--overload", type=float, default=2.0, help="the heavy tenant's rate: this times the target's capacity"
    )
    w.add_argument(
        "--light-load",
        type=float,
        default=0.25,
        help="the light tenant's rate: this times the target's capacity (its fair share is 0.5 at equal weights)",
    )
    w.add_argument(
        "--capacity-rps",
        type=float,
        default=None,
        help="the fairness run's capacity (default: the lowest rate that missed the SLO); without --stages, "
        "skips the saturation search",
    )
    w.add_argument("--fairness-s", type=float, default=20.0)
    w.add_argument("--no-alone", action="store_true", help="skip the light tenant's run alone at its rate")
    w.add_argument(
        "--isolation-ratio", type=float, default=2.0, help="PASS: light p95 under the flood <= this x its p95 alone"
    )
    w.add_argument("--phase-timeout-s", type=float, default=600.0, help="bound on each locust run")
    w.add_argument("--locust-args", default=env("LOADTEST_LOCUST_ARGS", ""), help="more locustfile options")
    s = p.add_argument_group("many-adapters scenario")
    s.add_argument("--rate", type=float, default=None, help="offered rate, req/s (default: a share of the search's)")
    s.add_argument("--load-fraction", type=float, default=0.8, help="of the sustainable rate the search found")
    s.add_argument("--scenario-s", type=float, default=120.0, help="seconds of the measured stage")
    args = p.parse_args(argv)
    from .many_adapters import ADAPTERS

    many = args.scenario == "many-adapters"
    if args.adapters is None:
        args.adapters = int(env("LOADTEST_ADAPTERS", str(ADAPTERS if many else 20)))
    if many:  # the scenario measures lorafleet's adapter residency: no baseline, no fairness run
        args.no_baseline = args.no_fairness = True
    if args.models:
        if many:
            p.error("--models: not with --scenario many-adapters (it measures one model's adapter residency)")
        if "--models" in shlex.split(args.locust_args):
            p.error("--models: give it to the runner, not in --locust-args (it registers each model's adapters)")
        args.no_baseline = True  # the baseline is one diffusers pipeline on one model
    if args.capacity_rps is not None and args.capacity_rps <= 0:
        p.error(f"--capacity-rps must be > 0, got {args.capacity_rps}")
    if args.overload <= 0 or args.light_load <= 0:
        p.error(f"--overload and --light-load must be > 0, got {args.overload}, {args.light_load}")
    if args.rate is not None and args.rate <= 0 or not 0 < args.load_fraction <= 1:
        p.error(f"--rate must be > 0 and --load-fraction in (0, 1], got {args.rate}, {args.load_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import many_adapters
    from .adapters import register_adapters, write_adapters
    from .cluster import LocalCluster, MetricsSampler, listed_model_sources
    from .report import build_report
    from .traffic import adapter_names, model_adapter_prefix, parse_models

    out = Path(args.out or ROOT / ".lorafleet" / "loadtest" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine_info(), "args": vars(args), "started": time.time(), "phases": []}
    print(f"loadtest: writing to {out}", flush=True)
    cluster = None
    sampler = None
    try:
        if args.url:
            from deployments.engine.models import resolve_model_dir

            url, metrics_url, token = args.url.rstrip("/"), args.metrics_url, args.admin_token
            model_dir = resolve_model_dir(args.model_uri)
            listed = listed_model_sources(url, token)
            sources = {name: (uri, None) for name, uri in listed.items()}
            model_name = next(iter(listed))
            replicas_fn = None
            slot_budget = None  # the target's config is not ours to read
        else:
            print("starting lorafleet on a local Ray instance (127.0.0.1) ...", flush=True)
            cluster = LocalCluster.start(Path(args.config), out / "cluster")
            url, metrics_url, token = cluster.url, cluster.metrics_url, cluster.admin_token
            model_dir, model_name, replicas_fn = cluster.model_dir, cluster.model_name, cluster.replicas
            sources = cluster.model_sources
            slot_budget = cluster_lora_config(Path(args.config))
        mix = parse_models(args.models)
        # Adapters belong to one base model: with a mix, each model gets its own, built from its own
        # architecture and registered for it (model=<name>); without, the default model's, as before.
        model_dirs: dict[str | None, Path | None] = {None: model_dir}
        if mix and args.adapters:
            model_dirs = dict(model_dirs_for_mix(mix, sources, url))
        elif mix:  # no adapters to build
            check_mix_served(mix, list(sources), url)
            model_dirs = dict.fromkeys(name for name, _ in mix)
        adapters_of: dict[str | None, list[str]] = {}
        files: dict[str, Path] = {}
        for model, directory in model_dirs.items():
            names = adapter_names(args.adapters, model_adapter_prefix(args.adapter_prefix, model))
            adapters_of[model] = names
            if not names:
                continue
            if not token:
                raise SystemExit("error: registering adapters needs --admin-token (or $LORAFLEET_ADMIN_TOKEN)")
            model_files = write_adapters(directory, out / "adapters" / (model or ""), names, rank=args.adapter_rank)
            for_model = f" for {model}" if model else ""
            print(f"registering {len(names)} synthetic adapters (rank {args.adapter_rank}){for_model} ...", flush=True)
            register_adapters(url, token, model_files, model=model)
            files.update(model_files)
        targets = {"lorafleet": url}
        if not args.no_baseline:
            if args.baseline_url:
                targets["baseline"] = args.baseline_url.rstrip("/")
            elif cluster is not None:
                print("starting the diffusers baseline ...", flush=True)
                targets["baseline"] = cluster.start_baseline(files, args.baseline_torch_threads)
        info["targets"] = targets
        info["model_name"] = model_name
        info["models"] = [{"name": name, "weight": w} for name, w in mix]
        for name, target in targets.items():
            for model, model_adapters in adapters_of.items():
                print(f"warming up {name}" + (f" (model {model})" if model else "") + " ...", flush=True)
                warm_up(target, model_name, model_adapters, model=model)

        sampler = MetricsSampler(metrics_url, interval_s=2.0, replicas_fn=replicas_fn).start()
        common = [
            "--adapters", str(args.adapters), "--adapter-prefix", args.adapter_prefix, "--model-name", model_name,
            "--slo-ms", str(args.slo_ms), "--warmup-s", str(args.warmup_s), "--concurrency", str(args.concurrency),
            *(["--models", args.models] if mix else []),
            *(many_adapters.LOCUST_ARGS if args.scenario == many_adapters.NAME else []),
            *shlex.split(args.locust_args),
        ]  # fmt: skip
        if args.scenario == many_adapters.NAME and args.rate is not None:
            sustainable, lowest_failing = {}, {}
        elif args.capacity_rps is not None and not args.stages:  # capacity given: no search
            sustainable, lowest_failing = {}, {}
        elif args.stages:
            sustainable, lowest_failing = {}, {}
            for name, target in targets.items():
                phase = {"name": f"{name}-stages", "target": name, "dir": f"{name}-stages", "start": time.time()}
                print(f"[{phase['name']}] {args.stages} on {target}", flush=True)
                plan = ["--plan", "stages", "--stages", args.stages]
                log = run_locust(target, out / phase["dir"], plan, common, args.phase_timeout_s)
                phase["end"] = time.time()
                info["phases"].append(phase)
                sustainable[name] = max((st["rate_rps"] for st in log["stages"] if st["passed"]), default=None)
                lowest_failing[name] = min((st["rate_rps"] for st in log["stages"] if not st["passed"]), default=None)
                _write(out / "run.json", info, sampler)
        else:
            sustainable, lowest_failing = interleaved_search(targets, out, args, common, info, sampler)

        if not args.no_fairness:
            for name, target in targets.items():
                # Overload whatever the machine's mood: relative to the lowest rate that missed the SLO.
                capacity = (
                    args.capacity_rps or lowest_failing.get(name) or 2 * (sustainable.get(name) or args.start_rps)
                )
                for phase in fairness_phases(name, capacity, args):
                    print(f"[{phase['name']}] {phase['tenants']} at {phase['rate_rps']} req/s", flush=True)
                    fixed_phase(phase, target, out, args.fairness_s, [*common, "--tenants", phase["tenants"]], args,
                                info, sampler)  # fmt: skip

        if args.scenario == many_adapters.NAME:
            saturation = sustainable.get("lorafleet")
            if args.rate is None and saturation is None:
                raise SystemExit("many-adapters: no stage of the search met the SLO; give the rate with --rate")
            rate = args.rate if args.rate is not None else round(args.load_fraction * saturation, 3)
            phase = {
                "name": many_adapters.PHASE, "target": "lorafleet", "dir": many_adapters.PHASE, "rate_rps": rate,
                "scenario": many_adapters.NAME, "saturation_rps": None if args.rate is not None else saturation,
                "load_fraction": None if args.rate is not None else args.load_fraction, "slot_budget": slot_budget,
            }  # fmt: skip
            print(f"[{phase['name']}] {rate} req/s for {args.scenario_s:.0f} s", flush=True)
            fixed_phase(phase, url, out, args.scenario_s, common, args, info, sampler)
    finally:
        if sampler is not None:
            time.sleep(3.0)  # Ray exports metrics every second or so: let the last requests show
            sampler.stop()
            sampler.sample_once()
        info["machine"]["loadavg_end"] = os.getloadavg()
        info["ended"] = time.time()
        _write(out / "run.json", info, sampler)
        if cluster is not None:
            print("shutting the local cluster down ...", flush=True)
            cluster.shutdown()
    summary = build_report(out)
    print("\n" + summary["summary_md"], flush=True)
    print(f"report: {out / 'report.md'}", flush=True)
    return 0


def fairness_phases(target: str, capacity: float, args) -> list[dict]:
    """The fairness run's phases on ``target``: the light tenant alone at its rate (unless ``--no-alone``),
    then both tenants. Without ``--fairness-tenants``: heavy at ``--overload`` x ``capacity`` and light at
    ``--light-load`` x ``capacity`` (tenants ``heavy=<overload>,light=<light-load>`` at their sum); with it,
    its shares of ``--overload`` x ``capacity``, the smallest share the light tenant."""
    from .traffic import parse_tenants

    if args.fairness_tenants:
        spec, rate = args.fairness_tenants, args.overload * capacity
    else:
        spec = f"heavy={args.overload:g},light={args.light_load:g}"
        rate = (args.overload + args.light_load) * capacity
    tenants = parse_tenants(spec)
    total = sum(t.weight for t in tenants)
    light = min(tenants, key=lambda t: t.weight)
    light_rps = round(rate * light.weight / total, 3)
    common = {"target": target, "capacity_rps": capacity, "light_tenant": light.name, "light_rps": light_rps}
    phases = []
    if not args.no_alone:
        phases.append({
            "name": f"{target}-alone", "kind": "alone", "dir": f"{target}-alone", "rate_rps": light_rps,
            "tenants": f"{light.name}=1", **common,
        })  # fmt: skip
    phases.append({
        "name": f"{target}-fairness", "kind": "fairness", "dir": f"{target}-fairness", "rate_rps": round(rate, 3),
        "tenants": spec, "isolation_ratio": args.isolation_ratio, **common,
    })  # fmt: skip
    return phases


def fixed_phase(phase: dict, target: str, out: Path, seconds: float, locust_args: list[str], args, info, sampler):
    """One stage at ``phase["rate_rps"]`` for ``seconds`` in its own locust process, recorded in ``run.json``."""
    phase["start"] = time.time()
    run_locust(
        target,
        out / phase["dir"],
        ["--plan", "stages", "--stages", f"{phase['rate_rps']}:{seconds}"],
        locust_args,
        args.phase_timeout_s,
    )
    phase["end"] = time.time()
    info["phases"].append(phase)
    _write(out / "run.json", info, sampler)


def _write(path: Path, info: dict, sampler) -> None:
    doc = {**info, "samples": sampler.samples if sampler is not None else []}
    path.write_text(json.dumps(doc, default=str))


if __name__ == "__main__":
    sys.exit(main())
