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


@pytest.mark.timeout(600)
def test_loadtest_mixes_models_smoke(multi_app, cluster, tmp_path):
    """``--models`` against the session's two-model app: adapters built and registered per model, the
    warm-up wakes tiny-sdxl (it scales from zero), one 10 s stage at 2 req/s mixing both models 1:1.

    tiny-sdxl's fixture goes back to zero 2 s after its last request, so a stage's first tiny-sdxl
    request may wait for a replica again: timeouts are generous, and only what is invariant is asserted.
    """
    import requests

    from loadtest.run import main

    from conftest import ADMIN_TOKEN

    out = tmp_path / "run"
    rc = main(
        [
            "--out", str(out), "--url", multi_app.url, "--metrics-url", cluster.metrics_url,
            "--admin-token", ADMIN_TOKEN, "--models", "tiny-sd=1,tiny-sdxl=1",
            "--no-fairness", "--stages", "2:10", "--warmup-s", "1",
            "--adapters", "2", "--adapter-prefix", "mix-", "--concurrency", "6", "--phase-timeout-s", "300",
            "--locust-args", "--steps-mix 3 --sizes 64x64 --images-mix 1 --request-timeout-s 240 --drain-timeout-s 240",
        ]
    )  # fmt: skip
    assert rc == 0
    # registered for their own base model (form field `model`)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for model in ("tiny-sd", "tiny-sdxl"):
        listed = requests.get(f"{multi_app.url}/v1/adapters?model={model}&tag=loadtest", headers=admin, timeout=60)
        names = {a["name"] for a in listed.json()["data"] if a["name"].startswith("mix-")}
        assert names == {f"mix-{model}-000", f"mix-{model}-001"}, listed.text
    records = [json.loads(line) for line in (out / "lorafleet-stages" / "requests.jsonl").read_text().splitlines()]
    stages = json.loads((out / "lorafleet-stages" / "stages.json").read_text())["stages"]
    not_sent = sum(ln["dropped_arrivals"] + ln["voided_arrivals"] for s in stages for ln in s["lanes"].values())
    assert len(records) + not_sent == 20
    assert all(r["ok"] for r in records), [r["error"] for r in records if not r["ok"]]
    assert {r["model"] for r in records} == {"tiny-sd", "tiny-sdxl"}
    assert all(a.startswith(f"mix-{r['model']}-") for r in records for a in r["adapters"])
    summary = json.loads((out / "summary.json").read_text())
    per_model = summary["models"]["lorafleet-stages"]["stages"][0]["models"]
    assert sum(x["requests"] for x in per_model.values()) == stages[0]["stats"]["requests"]  # after its warm-up
    everything = summary["models"]["lorafleet-stages"]["all"]
    assert sum(x["requests"] for x in everything.values()) == summary["phases"]["lorafleet-stages"]["requests"]
    for model, x in per_model.items():
        window = (stages[0]["start"] + 1, stages[0]["end"])
        in_window = [r for r in records if r["model"] == model and window[0] <= r["t"] < window[1]]
        assert x["requests"] == len(in_window) and x["failed"] == 0
        assert x["requests"] == 0 or 0 < x["p50_ms"] <= x["p95_ms"]
    report = (out / "report.md").read_text()
    assert "## Per model" in report and "| lorafleet-stages | 2.00 req/s | tiny-sdxl |" in report
