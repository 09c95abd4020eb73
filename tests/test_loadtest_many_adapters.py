"""The many-adapters load-test scenario's pure parts: its traffic, the popularity classes, the adapter
metrics, the target rule and its section of the report. No cluster, no locust."""

from __future__ import annotations

import collections
import json
import math
import random
from pathlib import Path

import pytest

from loadtest import many_adapters as ma
from loadtest.traffic import RequestFactory, TrafficConfig

ROOT = Path(__file__).resolve().parent.parent


def test_scenario_traffic_draws_are_seeded_and_follow_zipf():
    """10,000 draws of the scenario's adapter choice with seed 0: exact counts (the seed fixes them), near the
    Zipf law's shares: popular 0.8 H(8, 1.1) / H(200, 1.1) = 42.8%, rare 37.2%, none 20%."""
    factory = RequestFactory(TrafficConfig(adapters=ma.ADAPTERS, **ma.TRAFFIC), random.Random(0))
    classes, names = collections.Counter(), collections.Counter()
    for _ in range(10_000):
        loras = factory.loras()
        assert len(loras) <= 1  # one adapter per request: each request has one class
        classes[ma.adapter_class({"adapters": [n for n, _ in loras]}, "lt-style-")] += 1
        names.update(n for n, _ in loras)
    assert classes == {"popular": 4205, "rare": 3765, "no adapter": 2030}
    assert [names[f"lt-style-{k:03d}"] for k in range(9)] == [1691, 786, 506, 391, 260, 213, 188, 170, 166]
    assert len(names) == 200  # every registered adapter is asked for
    harmonic = [sum(k**-ma.ZIPF_S for k in range(1, n + 1)) for n in (ma.POPULAR, ma.ADAPTERS)]
    assert classes["popular"] / 10_000 == pytest.approx(0.8 * harmonic[0] / harmonic[1], abs=0.015)


def test_scenario_locust_args_are_locustfile_options():
    assert ma.LOCUST_ARGS == [
        "--zipf-s", "1.1", "--no-lora-share", "0.2", "--multi-lora-share", "0.0", "--openai-share", "0.0",
        "--tenants", "heavy=3,light=1",
    ]  # fmt: skip
    locustfile = (ROOT / "loadtest" / "locustfile.py").read_text()
    for option in ma.LOCUST_ARGS[::2]:
        assert f'("{option}", "{option[2:].replace("-", "_")}"' in locustfile


@pytest.mark.parametrize(
    "adapters, expected",
    [
        (["lt-style-000"], "popular"),
        (["lt-style-007"], "popular"),
        (["lt-style-008"], "rare"),
        (["lt-style-199"], "rare"),
        (["lt-style-008", "lt-style-000"], "rare"),  # the first adapter decides
        ([], "no adapter"),
        (["elsewhere-001"], "rare"),  # not one of the scenario's: never counted as popular
    ],
)
def test_adapter_class_top_8_against_the_rest(adapters, expected):
    assert ma.adapter_class({"adapters": adapters}, "lt-style-") == expected


def _rec(t, ms, adapter=None, ok=True, queue_ms=0.0, tenant="heavy"):
    r = {"t": t, "ms": ms, "ok": ok, "status": 200 if ok else 0, "tenant": tenant, "api": "native",
         "images": 1 if ok else 0, "adapters": [adapter] if adapter else [], "error": None}  # fmt: skip
    if ok:
        r["timings"] = {"queue_ms": queue_ms, "encode_ms": 10.0, "denoise_ms": 50.0, "decode_ms": 5.0}
    return r


def test_class_stats_latency_queue_share_and_time_outside_the_server():
    records = [
        _rec(0.5, 999.0, "lt-style-000"),  # before the window
        _rec(1.0, 100.0, "lt-style-000", queue_ms=0.0),  # outside the server timings: 100 - 65 = 35
        _rec(2.0, 300.0, "lt-style-001", queue_ms=200.0),  # 35
        _rec(3.0, 1065.0, "lt-style-050", queue_ms=1000.0),  # 0
        _rec(4.0, 2065.0, "lt-style-051", queue_ms=100.0),  # 1900: a wait the queue does not explain
        _rec(5.0, 0.0, "lt-style-052", ok=False),
        _rec(6.0, 80.0, None),
        _rec(10.0, 999.0),  # after the window
    ]
    s = ma.class_stats(records, 1.0, 10.0, "lt-style-")
    assert s["popular"]["requests"] == 2 and s["popular"]["failed"] == 0
    assert s["popular"]["p50_ms"] == 200.0 and s["popular"]["p95_ms"] == pytest.approx(290.0)
    assert s["popular"]["queue_share"] == pytest.approx(200 / 400)
    assert s["popular"]["outside_max_ms"] == pytest.approx(35.0)
    assert s["rare"]["requests"] == 3 and s["rare"]["failed"] == 1 and s["rare"]["error_rate"] == pytest.approx(1 / 3)
    assert s["rare"]["queue_share"] == pytest.approx(1100 / 3130)
    assert s["rare"]["outside_max_ms"] == pytest.approx(1900.0)
    assert s["rare"]["outside_p95_ms"] == pytest.approx(0 + 0.95 * 1900)
    assert s["no adapter"]["requests"] == 1 and s["no adapter"]["p99_ms"] == 80.0
    assert ma.class_stats([_rec(1.0, 50.0, "lt-style-001")], 0, 2, "lt-style-")["rare"]["requests"] == 0


def _classes(popular_p95, rare_p95, popular_errors=0.0, rare_errors=0.0):
    return {
        "popular": {"p95_ms": popular_p95, "error_rate": popular_errors},
        "rare": {"p95_ms": rare_p95, "error_rate": rare_errors},
    }


@pytest.mark.parametrize(
    "classes, ratio, passed",
    [
        (_classes(400.0, 560.0), 1.4, True),
        (_classes(400.0, 600.0), 1.5, True),  # the bound itself passes
        (_classes(400.0, 601.0), 1.5025, False),
        (_classes(400.0, 200.0), 0.5, True),
        (_classes(400.0, 500.0, rare_errors=0.02), 1.25, False),  # fast because the slow ones failed
        (_classes(400.0, 500.0, popular_errors=0.02), 1.25, False),
        (_classes(400.0, 500.0, rare_errors=0.01), 1.25, True),
        (_classes(400.0, math.nan), None, None),  # no successful rare request: nothing to compare
        (_classes(math.nan, 400.0), None, None),
    ],
)
def test_target_rule(classes, ratio, passed):
    check = ma.target_check(classes)
    assert check["passed"] is passed
    assert check["ratio"] == (pytest.approx(ratio) if ratio is not None else None)


@pytest.mark.parametrize(
    "buckets, q, expected",
    [
        ({"5.0": 90, "250.0": 98, "+Inf": 100}, 0.95, 250.0),
        ({"5.0": 90, "250.0": 98, "+Inf": 100}, 0.5, 5.0),
        ({"5.0": 90, "250.0": 94, "+Inf": 100}, 0.95, math.inf),
        ({"+Inf": 0.0}, 0.5, None),
        ({}, 0.5, None),
    ],
)
def test_bucket_quantile(buckets, q, expected):
    assert ma.bucket_quantile(buckets, q) == expected


def _sample(t, hit, miss, loads, prefetches=None, waits=None):
    metrics = {ma.ADAPTER_REQUESTS: {"hit": hit, "miss": miss}, ma.LOADS: {"": loads}}
    if prefetches is not None:
        metrics[ma.PREFETCHES] = {"": prefetches}
    if waits is not None:  # (<= 5 ms, <= 250 ms, all, sum)
        metrics[ma.WAIT + "_bucket"] = {"5.0": waits[0], "250.0": waits[1], "+Inf": waits[2]}
        metrics[ma.WAIT + "_count"] = {"": waits[2]}
        metrics[ma.WAIT + "_sum"] = {"": waits[3]}
    return {"t": t, "metrics": metrics, "replicas": {}}


def test_adapter_metrics_over_a_phase():
    samples = [
        _sample(99.0, 10, 5, 5, prefetches=1, waits=(10, 12, 12, 100.0)),
        _sample(110.0, 50, 10, 12, prefetches=3, waits=(40, 55, 57, 900.0)),
        _sample(119.0, 90, 15, 20, prefetches=5, waits=(80, 98, 112, 3000.0)),
        _sample(140.0, 999, 999, 999, prefetches=999, waits=(999, 999, 999, 9e9)),  # after the phase
    ]
    m = ma.adapter_metrics(samples, 100.0, 118.0)
    assert m["span_s"] == 20.0
    assert m["hit_ratio"] == pytest.approx(80 / 90)
    assert m["loads_per_s"] == pytest.approx(15 / 20) and m["misses_per_s"] == pytest.approx(10 / 20)
    assert m["prefetches_per_s"] == pytest.approx(4 / 20)
    assert m["waits"] == 100 and m["wait_mean_ms"] == pytest.approx(29.0)
    assert m["wait_p50_ms"] == 5.0 and m["wait_p95_ms"] == math.inf and m["waited_share"] == pytest.approx(0.3)
    # no prefetch yet: Ray has not exported the counter, but the same Denoiser exports waits, so it is 0
    cold = [_sample(99.0, 10, 5, 5, waits=(1, 1, 1, 0.0)), _sample(119.0, 20, 15, 15, waits=(2, 3, 3, 9.0))]
    cold = ma.adapter_metrics(cold, 100.0, 118.0)
    assert cold["prefetches_per_s"] == 0.0 and cold["waits"] == 2
    # a server without the issue-15 metrics (before it): waits and prefetches are unknown, not zero
    old = ma.adapter_metrics([_sample(99.0, 10, 5, 5), _sample(119.0, 20, 15, 15)], 100.0, 118.0)
    assert old["loads_per_s"] == pytest.approx(0.5) and old["hit_ratio"] == pytest.approx(0.5)
    assert old["prefetches_per_s"] is None and old["waits"] is None and old["wait_mean_ms"] is None


def test_scenario_section_of_the_report(tmp_path):
    from loadtest.report import build_report

    t0 = 1_000_000.0
    stage = {"index": 0, "rate_rps": 4.0, "start": t0, "end": t0 + 60, "warmup_s": 2.0, "passed": True}
    records = []
    for k in range(200):  # every 0.3 s: adapter k % 20 (8 popular, 12 rare), every 5th without one
        adapter = None if k % 5 == 0 else f"lt-style-{k % 20:03d}"
        rare = adapter is not None and k % 20 >= ma.POPULAR
        ms = 400.0 + 10 * (k % 7) + (100.0 if rare else 0.0)
        records.append(_rec(t0 + 2 + 0.29 * k, ms, adapter, queue_ms=ms - 100.0, tenant="light" if k % 4 else "heavy"))
    d = tmp_path / ma.PHASE
    d.mkdir()
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "stages.json").write_text(json.dumps({"stages": [stage], "tenants": []}))
    counter = ma.ADAPTER_REQUESTS
    samples = [
        {"t": t0 - 1, "metrics": {counter: {"hit": 0.0, "miss": 0.0}, ma.LOADS: {"": 0.0}}, "replicas": {}},
        {"t": t0 + 79, "metrics": {counter: {"hit": 120.0, "miss": 40.0}, ma.LOADS: {"": 40.0}}, "replicas": {}},
    ]
    phase = {
        "name": ma.PHASE, "target": "lorafleet", "dir": ma.PHASE, "rate_rps": 4.0, "scenario": ma.NAME,
        "saturation_rps": 5.0, "load_fraction": 0.8, "slot_budget": {"max_loras_per_replica": 64},
        "start": t0, "end": t0 + 70,
    }  # fmt: skip
    run = {"machine": {"cpu": "test cpu", "cpus": 2}, "args": {"slo_ms": 1000, "adapters": 200, "adapter_rank": 4}}
    (tmp_path / "run.json").write_text(json.dumps({**run, "started": t0 - 5, "phases": [phase], "samples": samples}))

    summary = build_report(tmp_path)
    s = summary["scenarios"][ma.NAME]
    assert {c: x["requests"] for c, x in s["classes"].items()} == {"no adapter": 40, "popular": 60, "rare": 100}
    assert s["target"]["ratio"] == pytest.approx(s["classes"]["rare"]["p95_ms"] / s["classes"]["popular"]["p95_ms"])
    assert s["target"]["passed"] is True and s["target"]["limit"] == 1.5
    assert s["classes"]["rare"]["queue_share"] == pytest.approx(1 - 100 * 100 / sum(
        r["ms"] for r in records if ma.adapter_class(r, "lt-style-") == "rare"))  # fmt: skip
    assert s["adapter_metrics"]["hit_ratio"] == pytest.approx(0.75) and s["adapter_metrics"]["loads_per_s"] == 0.5
    assert set(s["by_tenant"]) == {"heavy", "light"}
    assert "searches" in summary and summary["searches"] == {}  # the scenario's stage is no point of a search
    md = (tmp_path / "report.md").read_text()
    assert "## Scenario many-adapters" in md and "→ **PASS**" in md
    assert "| figure |" not in md  # no search, no fairness run: no empty summary table
    assert "4.00 req/s (80% of the 5.00 req/s the search sustained)" in md
    assert "`max_loras_per_replica` = 64" in md and "hit ratio 75.0%" in md
    assert "prefetches n/a;" in md and "loads 0.50/s" in md and "adapter wait: not exported by this server" in md


def test_runner_options_of_the_scenario(monkeypatch):
    from loadtest.run import parse_args

    monkeypatch.delenv("LOADTEST_ADAPTERS", raising=False)
    default = parse_args([])
    assert default.scenario == "default" and default.adapters == 20
    assert not default.no_baseline and not default.no_fairness
    many = parse_args(["--scenario", "many-adapters"])
    assert many.adapters == 200 and many.no_baseline and many.no_fairness
    assert many.rate is None and many.load_fraction == 0.8
    assert parse_args(["--scenario", "many-adapters", "--adapters", "12", "--rate", "2"]).adapters == 12
    for bad in (["--rate", "0"], ["--load-fraction", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(["--scenario", "many-adapters", *bad])


def test_sampler_keeps_the_adapter_histograms():
    from loadtest.cluster import reduce_families

    text = """\
# HELP ray_lorafleet_adapter_wait_ms Time an image waited.
# TYPE ray_lorafleet_adapter_wait_ms histogram
ray_lorafleet_adapter_wait_ms_bucket{Component="a",le="5.0"} 3.0
ray_lorafleet_adapter_wait_ms_bucket{Component="a",le="+Inf"} 5.0
ray_lorafleet_adapter_wait_ms_bucket{Component="b",le="5.0"} 1.0
ray_lorafleet_adapter_wait_ms_bucket{Component="b",le="+Inf"} 1.0
ray_lorafleet_adapter_wait_ms_count{Component="a"} 5.0
ray_lorafleet_adapter_wait_ms_count{Component="b"} 1.0
ray_lorafleet_adapter_wait_ms_sum{Component="a"} 123.0
# HELP ray_lorafleet_adapter_load_latency_ms Load.
# TYPE ray_lorafleet_adapter_load_latency_ms histogram
ray_lorafleet_adapter_load_latency_ms_bucket{le="5.0"} 1.0
ray_lorafleet_adapter_load_latency_ms_bucket{le="+Inf"} 2.0
ray_lorafleet_adapter_load_latency_ms_count 2.0
ray_lorafleet_adapter_load_latency_ms_sum 12.0
# HELP ray_lorafleet_adapter_prefetches_total Prefetches.
# TYPE ray_lorafleet_adapter_prefetches_total counter
ray_lorafleet_adapter_prefetches_total{Component="a"} 7.0
"""
    assert reduce_families(text) == {
        ma.WAIT + "_bucket": {"5.0": 4.0, "+Inf": 6.0},
        ma.WAIT + "_count": {"": 6.0},
        ma.WAIT + "_sum": {"": 123.0},
        ma.LOADS: {"": 2.0},
        ma.PREFETCHES: {"": 7.0},
    }
