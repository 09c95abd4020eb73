"""locust users and the load plan for lorafleet (and for the diffusers baseline, which speaks the same API).

Run it in its own process (gevent's monkey-patching makes Ray hang in the same one)::

    python -m locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \\
        --plan search --slo-ms 1000 --request-log out/requests.jsonl --stage-log out/stages.json

``python -m loadtest.run`` does that for you. Every knob below is a command-line
option and a ``LOADTEST_*`` environment variable (``--zipf-s`` / ``LOADTEST_ZIPF_S``);
``python -m locust -f loadtest/locustfile.py --help`` lists them.

**Arrivals are paced, not closed-loop.** Each tenant is a *lane*: a pool of users
and a ``pacing.Pacer`` that emits arrival tickets at the lane's share of the
stage's rate (Poisson, conditioned on the stage's count, by default). A user takes a ticket, sends one request and
waits for the answer, so the offered rate does not drop when the server slows
down, until every user of the lane is busy (then tickets older than a second are
dropped, counted per stage, and "sent" falls below "offered"). One lane per
tenant means a flooding tenant cannot hold back another tenant's arrivals on the
client side.

**Plans.** ``--plan search``: stages of ``--stage-s`` seconds at rates chosen by
``stats.SaturationSearch`` (grow by ``--growth`` until p95 > ``--slo-ms`` or errors >
``--max-error-rate``, then bisect). ``--plan stages --stages "2:20,4:20"``: fixed
rates and durations. Between stages the pacers stop and in-flight requests drain,
so each stage starts from an empty server. Users: ``NativeUser`` (``/v1/generate``)
and ``OpenAIUser`` (``/v1/images/generations``), in the ratio ``--openai-share``.

**Models.** ``--models tiny-sd=3,tiny-sdxl=1``: each request's base model, by weight, with
adapters only of its own model (``PREFIX<model>-000``...); each stage's log then has
per-model statistics. Without it requests carry no ``model`` (the server's default).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant, events, task

from loadtest.pacing import Pacer
from loadtest.stats import SaturationSearch, apportion, meets_slo, parse_stages, summarize, summarize_by_model
from loadtest.traffic import RequestFactory, Tenant, TrafficConfig, count_images, models_option, parse_tenants

log = logging.getLogger("loadtest")

MAX_LAG_S = 1.0  # arrival tickets nobody picked up within this (every user busy) are dropped
MIN_USERS_PER_LANE = 2


# -- options ----------------------------------------------------------------------------------------

TRAFFIC_OPTIONS = [
    # (option, TrafficConfig field, type, help)
    ("--adapters", "adapters", int, "registered adapters the traffic uses (names PREFIX000..)"),
    ("--adapter-prefix", "adapter_prefix", str, "adapter name prefix"),
    ("--zipf-s", "zipf_s", float, "Zipf exponent of adapter popularity (rank k ~ 1/k^s)"),
    ("--no-lora-share", "no_lora_share", float, "share of requests without a LoRA"),
    ("--multi-lora-share", "multi_lora_share", float, "share of LoRA requests composing two adapters (native API)"),
    ("--lora-scales", "lora_scales", str, "adapter scale range LO-HI (native API)"),
    ("--sizes", "sizes", str, "image sizes, weighted: 64x64=4,64x96=1"),
    ("--steps-mix", "steps", str, "denoising steps, weighted: 4=2,6=1,8=1"),
    ("--images-mix", "num_images", str, "images per request, weighted: 1=6,2=1"),
    ("--schedulers", "schedulers", str, "schedulers, weighted: default=3,euler=1"),
    ("--guidance-scale", "guidance_scale", float, "classifier-free guidance scale"),
    ("--negative-share", "negative_share", float, "share of requests with a negative prompt"),
    ("--openai-share", "openai_share", float, "share of users on the OpenAI Images API shape"),
    ("--tenants", "tenants", str, "tenants and their shares of the offered load: acme=4,globex=1"),
    ("--model-name", "model_name", str, "model name for the OpenAI shape (model or model:adapter)"),
    ("--models", "models", models_option, "base models, weighted: tiny-sd=3,tiny-sdxl=1 (default: no model field)"),
    ("--prompt-pool", "prompt_pool", int, "distinct prompts in the corpus"),
    ("--traffic-seed", "seed", int, "seed of the traffic model"),
]

PLAN_OPTIONS = [
    # (option, type, default, help)
    ("--plan", str, "search", "search (saturation search) or stages (fixed --stages)"),
    ("--stages", str, "2:20", "fixed plan: RATE_RPS:SECONDS,..."),
    ("--start-rps", float, 2.0, "search: first offered rate"),
    ("--growth", float, 1.5, "search: rate multiplier while every stage meets the SLO"),
    ("--resolution", float, 0.15, "search: stop when the failing/passing rate ratio is within 1 + this"),
    ("--max-stages", int, 8, "search: most stages"),
    ("--max-rps", float, 200.0, "search: highest rate tried"),
    ("--min-rps", float, 0.25, "search: lowest rate tried"),
    ("--stage-s", float, 12.0, "search: seconds per stage"),
    ("--warmup-s", float, 2.0, "seconds at the start of each stage left out of its statistics"),
    ("--slo-ms", float, 1000.0, "p95 latency objective, milliseconds"),
    ("--max-error-rate", float, 0.01, "largest failed share of a stage that still meets the SLO"),
    ("--drain-timeout-s", float, 120.0, "longest wait for in-flight requests between stages"),
    ("--request-timeout-s", float, 120.0, "client timeout per request"),
    ("--concurrency", int, 64, "users (concurrent requests at most), split over tenants by weight"),
    ("--arrival", str, "poisson", "arrivals: poisson (conditioned on each stage's count) or uniform"),
    ("--max-run-s", float, 900.0, "hard bound on the whole run"),
    ("--request-log", str, "", "write every request here (JSON lines)"),
    ("--stage-log", str, "", "write the stages and their statistics here (JSON)"),
]


def _env_name(option: str) -> str:
    return "LOADTEST_" + option.lstrip("-").replace("-", "_").upper()


@events.init_command_line_parser.add_listener
def _add_options(parser):
    defaults = TrafficConfig()
    for option, fld, typ, help_ in TRAFFIC_OPTIONS:
        parser.add_argument(
            option, type=typ, default=getattr(defaults, fld), env_var=_env_name(option), help=f"loadtest: {help_}"
        )
    for option, typ, default, help_ in PLAN_OPTIONS:
        parser.add_argument(option, type=typ, default=default, env_var=_env_name(option), help=f"loadtest: {help_}")


# -- run state: lanes, pacers, records ---------------------------------------------------------------


@dataclass
class Lane:
    tenant: Tenant
    share: float  # of the offered rate
    pacer: Pacer
    target_users: int
    users: int = 0
    by_api: dict = field(default_factory=dict)  # api -> users of that class in this lane


class Run:
    def __init__(self, options):
        self.options = options
        self.traffic = TrafficConfig(
            **{fld: getattr(options, opt[2:].replace("-", "_")) for opt, fld, *_ in TRAFFIC_OPTIONS}
        )
        tenants = parse_tenants(self.traffic.tenants)
        total_w = sum(t.weight for t in tenants)
        if options.arrival not in ("poisson", "uniform"):
            raise ValueError(f"--arrival must be poisson or uniform, got {options.arrival!r}")
        seed = self.traffic.seed
        self.lanes = [
            Lane(
                tenant=t,
                share=t.weight / total_w,
                pacer=Pacer(random.Random(f"{seed}-pacer-{t.name}"), options.arrival == "poisson", MAX_LAG_S),
                target_users=max(MIN_USERS_PER_LANE, round(options.concurrency * t.weight / total_w)),
            )
            for t in tenants
        ]
        self.total_users = sum(lane.target_users for lane in self.lanes)
        self.rng = random.Random(f"{seed}-stages")
        self.records: list[dict] = []
        self.inflight = 0
        self._seeds = 0

    def assign_lane(self, api: str) -> Lane:
        """The lane furthest below its quota of this user class, so every tenant gets both API shapes."""
        share = self.traffic.openai_share if api == "openai" else 1.0 - self.traffic.openai_share
        lane = max(self.lanes, key=lambda ln: (ln.target_users * share - ln.by_api.get(api, 0), ln.share))
        lane.users += 1
        lane.by_api[api] = lane.by_api.get(api, 0) + 1
        return lane

    def release_lane(self, lane: Lane, api: str) -> None:
        lane.users -= 1
        lane.by_api[api] -= 1

    def user_rng(self) -> random.Random:
        self._seeds += 1
        return random.Random(f"{self.traffic.seed}-user-{self._seeds}")

    def set_rate(self, rate: float, segments_s: tuple[float, ...] = ()) -> None:
        """Each lane gets its share of ``rate``; with segments, the stage's arrivals (rate x length per
        segment, randomly rounded) are split over the lanes exactly, so small lanes' rounding does not
        change the total offered."""
        if not segments_s or rate <= 0:
            for lane in self.lanes:
                lane.pacer.set_rate(rate * lane.share)
            return
        per_lane: list[list[int]] = [[] for _ in self.lanes]
        for length in segments_s:
            expected = rate * length
            total = int(expected) + (self.rng.random() < expected - int(expected))
            for counts, n in zip(per_lane, apportion(total, [ln.share for ln in self.lanes]), strict=True):
                counts.append(n)
        for lane, counts in zip(self.lanes, per_lane, strict=True):
            lane.pacer.set_rate(rate * lane.share, segments_s, tuple(counts))

    def write_records(self) -> None:
        path = self.options.request_log
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(path)


RUN: Run | None = None


@events.init.add_listener
def _on_init(environment, **_):
    global RUN
    options = environment.parsed_options
    if options is None:  # locust used as a library without our options
        return
    RUN = Run(options)
    share = RUN.traffic.openai_share
    NativeUser.weight = round(100 * (1 - share))
    OpenAIUser.weight = round(100 * share)
    environment.user_classes = [c for c in (NativeUser, OpenAIUser) if c.weight > 0]
    for cls in (NativeUser, OpenAIUser):
        cls.network_timeout = options.request_timeout_s
        cls.connection_timeout = min(10.0, options.request_timeout_s)


@events.quitting.add_listener
def _on_quit(environment, **_):
    if RUN is not None:
        RUN.write_records()


# -- users -------------------------------------------------------------------------------------------


class ImageUser(FastHttpUser):
    """One concurrent client of a tenant's lane: takes the lane's next arrival slot, sends, waits."""

    abstract = True
    api = "native"
    wait_time = constant(0)

    def on_start(self):
        self.lane = RUN.assign_lane(self.api)
        self.factory = RequestFactory(RUN.traffic, RUN.user_rng())

    def on_stop(self):
        RUN.release_lane(self.lane, self.api)

    @task
    def generate(self):
        if self.lane.pacer.take() is None:
            return  # paused, or no arrival for this lane yet
        req = self.factory.make(self.api, self.lane.tenant)
        record = {
            "t": time.time(),
            "ms": 0.0,
            "ok": False,
            "status": 0,
            "tenant": req.tenant,
            "api": req.api,
            "images": 0,
            "adapters": list(req.adapters),
            "model": req.model,
            "error": None,
        }
        RUN.inflight += 1
        start = time.perf_counter()
        try:
            with self.client.post(
                req.path, json=req.body, headers=req.headers, name=req.path, catch_response=True
            ) as resp:
                record["status"] = resp.status_code or 0
                if resp.status_code == 200:
                    try:
                        payload = resp.json()
                        got = count_images(req.api, payload)
                        if isinstance(payload.get("timings"), dict):
                            record["timings"] = payload["timings"]
                    except (ValueError, TypeError, AttributeError) as e:
                        got = -1
                        record["error"] = f"bad body: {e}"
                    if got == req.images:
                        record["ok"] = True
                        record["images"] = got
                        resp.success()
                    else:
                        record["error"] = record["error"] or f"expected {req.images} images, got {got}"
                        resp.failure(record["error"])
                else:
                    text = (resp.text or "")[:200] if resp.status_code else str(resp.error)[:200]
                    record["error"] = f"HTTP {resp.status_code}: {text}"
                    resp.failure(record["error"])
        finally:
            record["ms"] = 1000.0 * (time.perf_counter() - start)
            RUN.inflight -= 1
            RUN.records.append(record)


class NativeUser(ImageUser):
    api = "native"


class OpenAIUser(ImageUser):
    api = "openai"


# -- the load plan -----------------------------------------------------------------------------------


class LoadPlan(LoadTestShape):
    """Spawn every user, then run stages (fixed, or chosen by the saturation search), draining between them."""

    def __init__(self):
        super().__init__()
        self.state = "spawn"
        self.began = time.time()
        self.stage: dict | None = None
        self.stages: list[dict] = []
        self.search: SaturationSearch | None = None
        self.fixed: list[tuple[float, float]] = []

    def _setup(self):
        o = RUN.options
        if o.plan == "search":
            self.search = SaturationSearch(
                o.start_rps, o.growth, o.resolution, o.max_stages, min_rps=o.min_rps, max_rps=o.max_rps
            )
        elif o.plan == "stages":
            self.fixed = parse_stages(o.stages)
        else:
            raise ValueError(f"--plan must be search or stages, got {o.plan!r}")

    def _next(self) -> tuple[float, float] | None:
        o = RUN.options
        if self.search is not None:
            rate = self.search.next_rate()
            return None if rate is None else (rate, o.stage_s)
        return self.fixed.pop(0) if self.fixed else None

    def _start_stage(self, now: float) -> bool:
        nxt = self._next()
        if nxt is None:
            return False
        rate, seconds = nxt
        self.stage = {"index": len(self.stages), "rate_rps": rate, "start": now, "end": now + seconds}
        self._dropped_before = {ln.tenant.name: ln.pacer.dropped for ln in RUN.lanes}
        self._voided_before = {ln.tenant.name: ln.pacer.voided for ln in RUN.lanes}
        warmup = self._warmup(seconds)
        RUN.set_rate(rate, (warmup, seconds - warmup) if warmup > 0 else (seconds,))
        log.warning("stage %d: %.2f rps for %.0f s", self.stage["index"], rate, seconds)
        self.state = "run"
        return True

    @staticmethod
    def _warmup(seconds: float) -> float:
        return min(RUN.options.warmup_s, 0.5 * seconds)

    def _finish_stage(self, now: float) -> None:
        o = RUN.options
        st = self.stage
        warmup = self._warmup(st["end"] - st["start"])
        stats = summarize(RUN.records, st["start"], st["end"], st["rate_rps"], warmup)
        st.update(
            warmup_s=warmup,
            drain_s=now - st["end"],
            stats=stats.to_dict(),
            passed=meets_slo(stats, o.slo_ms, o.max_error_rate),
            lanes={
                ln.tenant.name: {
                    "users": dict(ln.by_api),
                    "dropped_arrivals": ln.pacer.dropped - self._dropped_before[ln.tenant.name],
                    # not handed out by the stage's end (late on a stalled client): neither sent nor dropped
                    "voided_arrivals": ln.pacer.voided - self._voided_before[ln.tenant.name],
                }
                for ln in RUN.lanes
            },
        )
        if RUN.traffic.models:
            st["models"] = summarize_by_model(RUN.records, st["start"], st["end"], warmup)
        if self.search is not None:
            self.search.record(st["rate_rps"], st["passed"])
        self.stages.append(st)
        log.warning(
            "stage %d: %.2f rps offered, %.2f done/s, p95 %s ms, errors %s -> %s",
            st["index"], st["rate_rps"], stats.throughput_rps, _fmt(stats.p95_ms), _fmt(stats.error_rate),
            "meets SLO" if st["passed"] else "misses SLO",
        )  # fmt: skip
        self._write_log()
        RUN.write_records()

    def _write_log(self, done: bool = False) -> None:
        o = RUN.options
        if not o.stage_log:
            return
        doc = {
            "plan": o.plan,
            "slo_ms": o.slo_ms,
            "max_error_rate": o.max_error_rate,
            "host": self.runner.environment.host,
            "tenants": [{"name": ln.tenant.name, "share": ln.share, "users": ln.target_users} for ln in RUN.lanes],
            "traffic": RUN.traffic.__dict__,
            "began": self.began,
            "stages": self.stages,
            "sustainable_rps": self.search.sustainable_rps if self.search is not None else None,
            "done": done,
        }
        Path(o.stage_log).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(o.stage_log + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(o.stage_log)

    def tick(self):
        now = time.time()
        o = RUN.options
        users = (RUN.total_users, RUN.total_users)
        if self.state == "spawn":
            self._setup()
            self.state = "spawning"
        if now - self.began > o.max_run_s and self.state != "done":
            log.warning("--max-run-s %.0f reached: stopping", o.max_run_s)
            RUN.set_rate(0)
            self.state = "done"
        if self.state == "spawning":
            if self.runner.user_count >= RUN.total_users or now - self.began > 30:
                if not self._start_stage(now):
                    self.state = "done"
        elif self.state == "run" and now >= self.stage["end"]:
            RUN.set_rate(0)
            self.state = "drain"
        if self.state == "drain" and (RUN.inflight == 0 or now - self.stage["end"] > o.drain_timeout_s):
            self._finish_stage(now)
            if not self._start_stage(now):
                self.state = "done"
        if self.state == "done":
            self._write_log(done=True)
            RUN.write_records()
            return None
        return users


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"
