"""The load-test kit end to end, small: the runner against the session's cluster on 127.0.0.1.

Synthetic adapters are registered through the admin API, locust runs headless in its own
process for two short fixed-rate stages (bounded in requests and time), Prometheus metrics
are sampled, and the report is written. Light load: the e2e cluster keeps small per-tenant
queues, and no request may fail.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_loadtest_smoke(cluster, tiny_dir, tmp_path):
    from loadtest.run import main

    from conftest import ADMIN_TOKEN

    out = tmp_path / "run"
    rc = main(
        [
            "--out", str(out), "--url", cluster.url, "--metrics-url", cluster.metrics_url,
            "--admin-token", ADMIN_TOKEN, "--model-uri", "builtin:tiny-sd",
            "--no-baseline", "--no-fairness", "--stages", "1:8,2:8", "--warmup-s", "1",
            "--adapters", "4", "--adapter-prefix", "smoke-", "--concurrency", "6", "--phase-timeout-s", "120",
            "--locust-args", "--steps-mix 4=3,6=1 --sizes 64x64 --request-timeout-s 60",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    phase = summary["phases"]["lorafleet-stages"]
    stages = json.loads((out / "lorafleet-stages" / "stages.json").read_text())["stages"]
    records = [json.loads(line) for line in (out / "lorafleet-stages" / "requests.jsonl").read_text().splitlines()]
    # bounded: two stages of 8 s at 1 and 2 requests/s (24 arrivals), nothing else; an arrival the
    # client could not send in time (every user busy on a slow server) is dropped or voided and counted
    not_sent = sum(ln["dropped_arrivals"] + ln["voided_arrivals"] for s in stages for ln in s["lanes"].values())
    assert len(records) + not_sent == 24
    assert 0 < phase["requests"] <= len(records)
    assert phase["failed"] == 0
    assert phase["images"] >= phase["requests"]
    assert phase["throughput_rps"] > 0 and phase["images_per_s"] > 0
    assert 0 < phase["p50_ms"] <= phase["p95_ms"] <= phase["p99_ms"]
    assert 0.0 <= phase["adapter_hit_ratio"] <= 1.0
    assert [s["rate_rps"] for s in stages] == [1.0, 2.0]
    for s in stages:
        assert s["stats"]["ok"] > 0 and s["stats"]["failed"] == 0 and s["stats"]["p95_ms"] > 0
    assert all(r["ok"] for r in records) and {r["api"] for r in records} <= {"native", "openai"}
    assert any(r["adapters"] for r in records)
    report = (out / "report.md").read_text()
    assert "## lorafleet: stages" in report and "(latency_vs_load.png)" in report
    assert (out / "latency_vs_load.png").stat().st_size > 1000 and (out / "timeline.png").stat().st_size > 1000


@pytest.mark.timeout(180)
def test_many_adapters_scenario_smoke(cluster, tmp_path):
    """``--scenario many-adapters`` at a given rate (no search), small: 12 adapters, one 8 s stage at 1 req/s."""
    from loadtest.run import main

    from conftest import ADMIN_TOKEN

    out = tmp_path / "run"
    rc = main(
        [
            "--out", str(out), "--url", cluster.url, "--metrics-url", cluster.metrics_url,
            "--admin-token", ADMIN_TOKEN, "--model-uri", "builtin:tiny-sd", "--scenario", "many-adapters",
            "--adapters", "12", "--adapter-prefix", "many-", "--rate", "1", "--scenario-s", "8", "--warmup-s", "1",
            "--concurrency", "6", "--phase-timeout-s", "120",
            "--locust-args", "--steps-mix 4 --sizes 64x64 --request-timeout-s 60",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["searches"] == {}  # --rate: no search
    s = summary["scenarios"]["many-adapters"]
    log = out / "lorafleet-many-adapters" / "requests.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert s["rate_rps"] == 1.0 and s["saturation_rps"] is None and s["window_s"] == 7.0
    in_window = sum(c["requests"] for c in s["classes"].values())
    assert 0 < in_window <= len(records) <= 8
    assert all(r["ok"] and r["timings"]["queue_ms"] >= 0 for r in records)  # native API only: every answer timed
    assert all(len(r["adapters"]) <= 1 and r["tenant"] in ("heavy", "light") for r in records)
    assert all(c["failed"] == 0 for c in s["classes"].values())
    m = s["adapter_metrics"]
    assert m["hit_ratio"] is None or 0.0 <= m["hit_ratio"] <= 1.0
    assert s["target"]["passed"] in (True, False, None) and s["target"]["limit"] == 1.5
    assert "## Scenario many-adapters" in (out / "report.md").read_text()
