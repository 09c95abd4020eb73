"""The ``many-adapters`` scenario (issue 15): many registered adapters, few slots, is a rare adapter slower?

    make loadtest LOADTEST_ARGS="--scenario many-adapters"            # search, then 80% of the sustainable rate
    make loadtest LOADTEST_ARGS="--scenario many-adapters --rate 3"   # a given rate, no search

The traffic is the ordinary traffic model (``traffic.py``) with these knobs: 200
synthetic adapters with Zipf(s = 1.1) popularity, 20% of requests without an
adapter, one adapter per request (so each request has one class), two tenants
offering 3:1, and only the native API (every answer carries lorafleet's
``timings``, which the OpenAI shape does not return). The runner first measures
the saturation rate of that traffic with the usual search (``--rate`` skips it),
then offers ``LOAD_FRACTION`` of it for one long stage, on the cluster's
shipped slot budget (``serve_config.yaml`` as it is).

Requests fall into three classes by their adapter's popularity rank: the
``POPULAR`` most popular adapters, the rest ("rare"), and no adapter. The
report gives each class's latency percentiles, how much of its latency was
spent in the Denoiser's fair queue (``timings.queue_ms``) and how much lies
outside every server timing (a wait the fair queue does not explain), the
adapter hit ratio and loads per second from the Denoiser's metrics, and the
issue's target: rare p95 <= ``TARGET_P95_RATIO`` x popular p95.

Pure functions over request records and metric samples; ``run.py`` runs it,
``report.py`` calls ``scenario_report``.
"""

from __future__ import annotations

import math

from .report import _fmt, _table, hit_ratio, latency_by_popularity, metric_bracket, metric_delta, popularity_bucket
from .stats import percentile

NAME = "many-adapters"
PHASE = "lorafleet-many-adapters"
ADAPTERS = 200
POPULAR = 8  # the most popular adapters: a shipped budget of 8 slots before issue 15 held exactly these
ZIPF_S = 1.1
NO_LORA_SHARE = 0.2
TENANTS = "heavy=3,light=1"
LOAD_FRACTION = 0.8  # of the measured saturation rate
TARGET_P95_RATIO = 1.5  # rare p95 <= this x popular p95
MAX_CLASS_ERROR_RATE = 0.01  # a class that lost more requests than this cannot pass, however fast the rest

CLASSES = ("no adapter", "popular", "rare")  # popularity_bucket's (none, top, rest)
# The scenario's traffic knobs (``traffic.TrafficConfig`` fields), passed to locust as options of the same
# names (--zipf-s ...); --locust-args given on the command line come after them and win.
TRAFFIC = {
    "zipf_s": ZIPF_S, "no_lora_share": NO_LORA_SHARE, "multi_lora_share": 0.0, "openai_share": 0.0, "tenants": TENANTS,
}  # fmt: skip
LOCUST_ARGS = [x for field, value in TRAFFIC.items() for x in ("--" + field.replace("_", "-"), str(value))]

WAIT = "ray_lorafleet_adapter_wait_ms"
LOADS = "ray_lorafleet_adapter_load_latency_ms_count"
PREFETCHES = "ray_lorafleet_adapter_prefetches_total"
ADAPTER_REQUESTS = "ray_lorafleet_adapter_requests_total"


def adapter_class(record: dict, prefix: str, popular: int = POPULAR) -> str:
    """``popular`` (rank 1..``popular``), ``rare`` (the rest) or ``no adapter``, by the request's adapter.

    >>> adapter_class({"adapters": ["lt-style-007"]}, "lt-style-"), adapter_class({"adapters": []}, "lt-style-")
    ('popular', 'no adapter')
    """
    return popularity_bucket(record, prefix, popular, CLASSES)


def server_ms(record: dict) -> float | None:
    """The time lorafleet accounts for (queue + encode + denoise + decode), None without ``timings``."""
    t = record.get("timings")
    if not t:
        return None
    return sum(float(t.get(k, 0.0)) for k in ("queue_ms", "encode_ms", "denoise_ms", "decode_ms"))


def class_stats(records: list[dict], start: float, end: float, prefix: str, popular: int = POPULAR) -> dict:
    """class -> latency percentiles, failures and where the time went, over requests started in [start, end).

    ``queue_share``: the class's total ``timings.queue_ms`` over its total latency. ``outside_ms``:
    latency minus every server timing (proxy, routing between stages, and any wait the fair queue
    does not see), per request; its p95 is small when waits are inside the queue.
    """
    by_class: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for r in records:
        if start <= r["t"] < end:
            by_class[adapter_class(r, prefix, popular)].append(r)
    out = {}
    for name, recs in by_class.items():
        ok = [r for r in recs if r["ok"]]
        timed = [r for r in ok if server_ms(r) is not None]
        lat = [r["ms"] for r in ok]
        queue = [float(r["timings"].get("queue_ms", 0.0)) for r in timed]
        out[name] = {
            "requests": len(recs),
            "failed": len(recs) - len(ok),
            "error_rate": (len(recs) - len(ok)) / len(recs) if recs else math.nan,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "timed": len(timed),
            "queue_share": sum(queue) / sum(r["ms"] for r in timed) if timed else math.nan,
            "queue_p95_ms": percentile(queue, 95),
            "outside_p95_ms": percentile([r["ms"] - server_ms(r) for r in timed], 95),
            "outside_max_ms": max((r["ms"] - server_ms(r) for r in timed), default=math.nan),
        }
    return out


def target_check(classes: dict, ratio_limit: float = TARGET_P95_RATIO, max_error_rate: float = MAX_CLASS_ERROR_RATE):
    """The issue's target: rare p95 <= ``ratio_limit`` x popular p95, neither class losing > ``max_error_rate``.

    Returns ``{"ratio": rare p95 / popular p95, "passed": True | False | None}`` (None: a class
    has no successful request, nothing to compare).

    >>> target_check({"popular": {"p95_ms": 400.0, "error_rate": 0.0}, "rare": {"p95_ms": 560.0, "error_rate": 0.0}})
    {'ratio': 1.4, 'passed': True}
    """
    pop, rare = classes["popular"], classes["rare"]
    if any(not isinstance(c["p95_ms"], float | int) or math.isnan(c["p95_ms"]) for c in (pop, rare)):
        return {"ratio": None, "passed": None}
    ratio = rare["p95_ms"] / pop["p95_ms"]
    lost = any(_num(c["error_rate"]) > max_error_rate for c in (pop, rare))
    return {"ratio": ratio, "passed": ratio <= ratio_limit and not lost}


def _num(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def bucket_quantile(buckets: dict[str, float], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (0..1), from cumulative ``{le: count}``.

    >>> bucket_quantile({"5.0": 90, "250.0": 98, "+Inf": 100}, 0.95)
    250.0
    """
    pts = sorted((float(le), n) for le, n in buckets.items())
    if not pts or pts[-1][1] <= 0:
        return None
    for le, n in pts:
        if n >= q * pts[-1][1]:
            return le
    return math.inf


def adapter_metrics(samples: list[dict], start: float, end: float) -> dict:
    """Hit ratio, loads/s, misses/s, prefetches/s and adapter waits from the Denoiser's metrics in [start, end].

    A figure the serving code does not export (before issue 15: waits, prefetches) is None.
    """
    first, last = metric_bracket(samples, start, end, ADAPTER_REQUESTS)
    span_s = last["t"] - first["t"] if first is not None and last is not None and last["t"] > first["t"] else None

    def per_s(series: str, label: str = "") -> float | None:
        d = metric_delta(samples, start, end, series)
        return d[label] / span_s if label in d and span_s else None

    buckets = metric_delta(samples, start, end, WAIT + "_bucket")
    waits = metric_delta(samples, start, end, WAIT + "_count").get("")
    wait_sum = metric_delta(samples, start, end, WAIT + "_sum").get("")
    zero = min(((float(le), n) for le, n in buckets.items()), default=(None, None))  # the first bucket: <= 5 ms
    prefetches = per_s(PREFETCHES)
    if prefetches is None and waits is not None and span_s:
        prefetches = 0.0  # Ray exports a counter once incremented: a server with adapter waits but none has made none
    return {
        "span_s": span_s,
        "hit_ratio": hit_ratio(samples, start, end),
        "loads_per_s": per_s(LOADS),
        "misses_per_s": per_s(ADAPTER_REQUESTS, "miss"),
        "prefetches_per_s": prefetches,
        "waits": waits,
        "wait_mean_ms": wait_sum / waits if waits else None,
        "wait_p50_ms": bucket_quantile(buckets, 0.50),
        "wait_p95_ms": bucket_quantile(buckets, 0.95),
        "waited_share": 1.0 - zero[1] / waits if waits and zero[1] is not None else None,
        "waited_over_ms": zero[0],
    }


def scenario_report(phase: dict, records: list[dict], stages_doc: dict, samples: list[dict], args: dict) -> dict:
    """The scenario's figures (``summary.json``) and its Markdown section."""
    stage = stages_doc["stages"][0]
    t0 = stage["start"] + stage.get("warmup_s", 0.0)
    prefix = args.get("adapter_prefix", "lt-style-")
    classes = class_stats(records, t0, stage["end"], prefix)
    check = target_check(classes)
    metrics = adapter_metrics(samples, phase["start"], phase["end"])
    tenants = latency_by_popularity(records, stage, prefix, POPULAR, CLASSES)
    out = {
        "rate_rps": stage["rate_rps"],
        "window_s": stage["end"] - t0,
        "saturation_rps": phase.get("saturation_rps"),
        "load_fraction": phase.get("load_fraction"),
        "slot_budget": phase.get("slot_budget"),
        "classes": classes,
        "target": {**check, "limit": TARGET_P95_RATIO},
        "adapter_metrics": metrics,
        "by_tenant": tenants,
    }
    out["markdown"] = scenario_markdown(out, args)
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return _fmt(None if x is None else 100 * x, digits, "%")


def _per_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}/s"


def _verdict(passed: bool | None) -> str:
    return {True: "**PASS**", False: "**FAIL**", None: "n/a"}[passed]


def scenario_markdown(s: dict, args: dict) -> str:
    rate = f"{s['rate_rps']:.2f} req/s"
    if s.get("saturation_rps") and s.get("load_fraction"):
        rate += f" ({s['load_fraction']:.0%} of the {s['saturation_rps']:.2f} req/s the search sustained)"
    budget = s.get("slot_budget") or {}
    rows = []
    for name in ("popular", "rare", "no adapter"):
        c = s["classes"][name]
        rows.append([
            name, str(c["requests"]), str(c["failed"]), _fmt(c["p50_ms"]), _fmt(c["p95_ms"]), _fmt(c["p99_ms"]),
            _pct(c["queue_share"], 0),
            _fmt(c["queue_p95_ms"]), _fmt(c["outside_p95_ms"]), _fmt(c["outside_max_ms"]),
        ])  # fmt: skip
    header = ["class", "requests", "failed", "p50 ms", "p95 ms", "p99 ms", "queue share of latency"]
    header += ["queue p95 ms", "outside server timings p95 ms", "max"]
    m = s["adapter_metrics"]
    t = s["target"]
    tenant_rows = [
        [tenant, *(f"{x['requests']}: {_fmt(x['p50_ms'])} / {_fmt(x['p95_ms'])}" if (x := b.get(c)) else "–"
                   for c in ("popular", "rare", "no adapter"))]
        for tenant, b in sorted(s["by_tenant"].items())
    ]  # fmt: skip
    wait = (
        f"adapter wait (`{WAIT}`, {_fmt(m['waits'])} images): mean {_fmt(m['wait_mean_ms'], 1)} ms, "
        f"p50 ≤ {_fmt(m['wait_p50_ms'])} ms, p95 ≤ {_fmt(m['wait_p95_ms'])} ms, "
        f"{_pct(m['waited_share'])} waited over "
        f"{_fmt(m['waited_over_ms'])} ms"
        if m["waits"]
        else "adapter wait: not exported by this server"
    )
    return "\n".join(
        [
            f"## Scenario {NAME}",
            "",
            f"{rate} for {s['window_s']:.0f} s measured; {args.get('adapters')} adapters (rank "
            f"{args.get('adapter_rank')}), Zipf s = {ZIPF_S}, {NO_LORA_SHARE:.0%} of requests without one, one per "
            f"request, tenants {TENANTS}, native API; slot budget `max_loras_per_replica` = "
            f"{budget.get('max_loras_per_replica', 'n/a')}. Classes: the {POPULAR} most popular adapters, the rest "
            "(rare), none.",
            "",
            _table(header, rows),
            f"Target: rare p95 ≤ {t['limit']} × popular p95 (and no class losing more than "
            f"{MAX_CLASS_ERROR_RATE:.0%}): rare / popular = {_fmt(t['ratio'], 2, '×')} → {_verdict(t['passed'])}.",
            "",
            f"Denoiser metrics over the phase: adapter hit ratio {_pct(m['hit_ratio'])}, "
            f"loads {_per_s(m['loads_per_s'])}, misses {_per_s(m['misses_per_s'])}, "
            f"prefetches {_per_s(m['prefetches_per_s'])}; {wait}.",
            "",
            "Queue share: the class's total `timings.queue_ms` over its total latency. Outside server timings: "
            "latency minus queue, encode, denoise and decode (HTTP, routing between stages, and any wait the "
            "fair queue does not see).",
            "",
            "Per tenant (requests: p50 / p95 ms):",
            "",
            _table(["tenant", "popular", "rare", "no adapter"], tenant_rows),
        ]
    )
