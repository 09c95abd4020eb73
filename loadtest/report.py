"""The load-test report: ``report.md`` with PNG plots and ``summary.json``, from a run directory.

    python -m loadtest.report .lorafleet/loadtest/20261127-101500     # (re)build from the logs

Inputs (written by ``loadtest.run``): ``run.json`` (machine, arguments, phases,
metric samples) and, per phase, ``<phase>/requests.jsonl`` and ``<phase>/stages.json``
(``loadtest.stats`` documents both). Every figure is recomputed from those logs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .stats import percentile, summarize, summarize_by_model
from .traffic import model_adapter_prefix

TARGET_STYLE = {"lorafleet": {"color": "tab:blue", "ls": "-"}, "baseline": {"color": "tab:orange", "ls": "--"}}


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _fmt(x, digits: int = 0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


# -- figures from the logs ---------------------------------------------------------------------------


def phase_overall(records: list[dict], stages: list[dict]) -> dict:
    """All stages of a phase together: totals and latency percentiles of successful requests."""
    if not stages:
        return {"requests": 0, "ok": 0, "failed": 0, "images": 0}
    start, end = stages[0]["start"], stages[-1]["end"]
    mean_rate = sum(s["rate_rps"] * (s["end"] - s["start"]) for s in stages) / max(1e-9, end - start)
    s = summarize(records, start, end, mean_rate).to_dict()
    s["duration_s"] = end - start
    by_model = summarize_by_model(records, start, end)
    if by_model:  # traffic that mixes models (--models)
        s["models"] = by_model
    return s


def models_by_stage(records: list[dict], stages: list[dict]) -> list[dict]:
    """Per stage, each base model's figures over the stage's measured window (``stats.summarize_by_model``);
    ``[]`` when the traffic does not mix models."""
    out = []
    for st in stages:
        by_model = summarize_by_model(records, st["start"], st["end"], st.get("warmup_s", 0.0))
        if by_model:
            out.append({"index": st.get("index"), "rate_rps": st["rate_rps"], "models": by_model})
    return out


def target_search(stages_doc: dict) -> dict:
    """Stages sorted by offered rate, and the sustainable rate (highest that met the SLO)."""
    stages = sorted(stages_doc.get("stages", []), key=lambda s: s["rate_rps"])
    passed = [s for s in stages if s["passed"]]
    best = max(passed, key=lambda s: s["rate_rps"]) if passed else None
    return {
        "stages": stages,
        "sustainable_rps": best["rate_rps"] if best else None,
        "at_sustainable": best["stats"] if best else None,
    }


def common_rate(a: list[dict], b: list[dict]) -> tuple[float | None, bool]:
    """The highest offered rate both targets ran and met the SLO at; else the lowest rate both ran.

    Returns (rate, both_passed).
    """
    pa = {round(s["rate_rps"], 6): s["passed"] for s in a}
    pb = {round(s["rate_rps"], 6): s["passed"] for s in b}
    shared = sorted(set(pa) & set(pb))
    both = [r for r in shared if pa[r] and pb[r]]
    if both:
        return both[-1], True
    return (shared[0], False) if shared else (None, False)


def _stage_at(stages: list[dict], rate: float) -> dict:
    return next(s for s in stages if round(s["rate_rps"], 6) == rate)


def fairness(records: list[dict], stages_doc: dict) -> dict:
    """Per tenant: offered share, requests, failures, completed images and their share, latency."""
    stage = stages_doc["stages"][0]
    t0 = stage["start"] + stage.get("warmup_s", 0.0)
    window = [r for r in records if t0 <= r["t"] < stage["end"]]
    tenants = {t["name"]: t["share"] for t in stages_doc.get("tenants", [])}
    total_images = sum(r["images"] for r in window if r["ok"])
    out = {}
    for name, share in tenants.items():
        mine = [r for r in window if r["tenant"] == name]
        ok = [r for r in mine if r["ok"]]
        images = sum(r["images"] for r in ok)
        out[name] = {
            "offered_share": share,
            "offered_rps": share * stage["rate_rps"],
            "requests": len(mine),
            "ok": len(ok),
            "failed": len(mine) - len(ok),
            "images": images,
            "image_share": images / total_images if total_images else math.nan,
            "p50_ms": percentile([r["ms"] for r in ok], 50),
            "p95_ms": percentile([r["ms"] for r in ok], 95),
            # lorafleet's own account (native API): time waiting for the denoiser, where fair queuing acts
            "queue_p50_ms": percentile(
                [r["timings"]["queue_ms"] for r in ok if "queue_ms" in r.get("timings", {})], 50
            ),
            "images_per_s": images / (stage["end"] - t0),
            "refused": refusals(mine),
            # arrivals its client could not send (every user of its lane still waiting): asked, never sent
            "unsent": sum(
                (stage.get("lanes", {}).get(name) or {}).get(k, 0) for k in ("dropped_arrivals", "voided_arrivals")
            ),
            "stage_ms": stage_times(ok),
        }
    return {"rate_rps": stage["rate_rps"], "window_s": stage["end"] - t0, "tenants": out}


SEQUENTIAL_MS = ("admission_ms", "encode_ms", "queue_ms", "denoise_ms", "decode_ms")


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def refusals(records: list[dict]) -> dict[str, int]:
    """Failed requests by kind: ``429`` (over a quota), ``503`` (overloaded), ``other`` (timeouts, errors)."""
    out = {"429": 0, "503": 0, "other": 0}
    for r in records:
        if not r["ok"]:
            out[str(r.get("status")) if str(r.get("status")) in ("429", "503") else "other"] += 1
    return out


def stage_times(records: list[dict]) -> dict[str, dict]:
    """p50/p95 of each of lorafleet's ``timings`` (native API: ``encode_ms``, ``queue_ms``, ``denoise_ms``,
    ``decode_ms``, and whatever else the server reports, e.g. an admission wait), and ``other_ms``: the
    client's latency that no server timing covers (HTTP, the proxy, the ingress, hand-offs between stages)."""
    timed = [r for r in records if isinstance(r.get("timings"), dict) and r["timings"]]
    keys = sorted({k for r in timed for k, v in r["timings"].items() if k.endswith("_ms") and _is_num(v)})
    out = {}
    for key in keys:
        values = [r["timings"][key] for r in timed if _is_num(r["timings"].get(key))]
        out[key] = {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": sum(values) / len(values)}
    if timed:  # the consecutive parts of a request (a server's finer waits may lie inside them)
        other = [
            r["ms"] - sum(r["timings"].get(k) or 0.0 for k in SEQUENTIAL_MS if _is_num(r["timings"].get(k)))
            for r in timed
        ]
        out["other_ms"] = {"p50": percentile(other, 50), "p95": percentile(other, 95), "mean": sum(other) / len(other)}
    return out


def isolation(fair: dict, alone: dict | None, phase: dict) -> dict:
    """Issue 21's item 4 for one target: the light tenant under the flood against itself alone at the same rate.

    PASS when nothing of the light tenant's was refused or failed (no 429/503) and its p95 under the flood is at
    most ``isolation_ratio`` (2) x its p95 alone. ``below_fair_share``: its offered rate is under half the
    capacity (its fair share at equal weights), the premise of the check."""
    name = phase.get("light_tenant") or min(fair["tenants"], key=lambda t: fair["tenants"][t]["offered_share"])
    light = fair["tenants"].get(name, {})
    solo = (alone or {}).get("tenants", {}).get(name)
    ratio_limit = float(phase.get("isolation_ratio", 2.0))
    capacity = phase.get("capacity_rps")
    offered = light.get("offered_rps")
    p95, p95_alone = light.get("p95_ms"), solo["p95_ms"] if solo else None
    ratio = p95 / p95_alone if p95 is not None and p95_alone and not math.isnan(p95) else None
    failed = light.get("failed", 0)
    served_all = light.get("requests", 0) > 0 and failed == 0
    return {
        "light_tenant": name,
        "capacity_rps": capacity,
        "light_offered_rps": offered,
        "fair_share_rps": capacity / 2 if capacity else None,
        "below_fair_share": bool(capacity and offered is not None and offered < capacity / 2),
        "light_requests": light.get("requests", 0),
        "light_failed": failed,
        "light_refused": light.get("refused", {}),
        "light_unsent": light.get("unsent", 0),
        "p50_ms": light.get("p50_ms"),
        "p95_ms": p95,
        "alone_requests": solo["requests"] if solo else 0,
        "alone_failed": solo["failed"] if solo else None,
        "alone_p50_ms": solo["p50_ms"] if solo else None,
        "alone_p95_ms": p95_alone,
        "p95_ratio": ratio,
        "ratio_limit": ratio_limit,
        "served_all": served_all,
        "within_ratio": ratio is not None and ratio <= ratio_limit,
        "passed": served_all and ratio is not None and ratio <= ratio_limit,
    }


POPULARITY_BUCKETS = ("no LoRA", "adapters ranked 1-3", "adapters ranked 4+")


def popularity_bucket(
    record: dict, prefix: str, top: int = 3, buckets: tuple[str, str, str] = POPULARITY_BUCKETS
) -> str:
    """Which Zipf bucket a request's first adapter falls into (names are ``prefix`` + rank - 1; with mixed
    models, each model's own ranks: ``prefix`` + model + ``-`` + rank - 1).

    ``buckets``: the names of (no adapter, the ``top`` most popular, the rest).

    >>> popularity_bucket({"adapters": ["lt-style-002"]}, "lt-style-")
    'adapters ranked 1-3'
    >>> popularity_bucket({"adapters": ["lt-style-tiny-sdxl-001"], "model": "tiny-sdxl"}, "lt-style-")
    'adapters ranked 1-3'
    """
    none, popular, rest = buckets
    if not record.get("adapters"):
        return none
    suffix = record["adapters"][0].removeprefix(model_adapter_prefix(prefix, record.get("model")))
    return popular if suffix.isdigit() and int(suffix) < top else rest


def latency_by_popularity(
    records: list[dict], stage: dict, prefix: str, top: int = 3, buckets: tuple[str, str, str] = POPULARITY_BUCKETS
) -> dict[str, dict[str, dict]]:
    """tenant -> bucket -> {requests, p50_ms, p95_ms} over a stage's window (successful requests)."""
    t0 = stage["start"] + stage.get("warmup_s", 0.0)
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["ok"] and t0 <= r["t"] < stage["end"]:
            out.setdefault(r["tenant"], {}).setdefault(popularity_bucket(r, prefix, top, buckets), []).append(r["ms"])
    return {
        tenant: {b: {"requests": len(v), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95)}
                 for b, v in buckets.items()}
        for tenant, buckets in out.items()
    }  # fmt: skip


def metric_bracket(samples: list[dict], start: float, end: float, series: str) -> tuple[dict | None, dict | None]:
    """The samples bracketing [start, end] that carry ``series`` (the nearest inside where none is outside)."""
    inside = [s for s in samples if s["metrics"].get(series) is not None]
    before = [s for s in inside if s["t"] <= start]
    after = [s for s in inside if s["t"] >= end]
    first = before[-1] if before else next((s for s in inside if s["t"] >= start), None)
    last = after[0] if after else (inside[-1] if inside else None)
    return first, last


def metric_delta(samples: list[dict], start: float, end: float, series: str) -> dict[str, float]:
    """Increase of a counter (per label value) between the samples bracketing [start, end]."""
    first, last = metric_bracket(samples, start, end, series)
    if first is None or last is None:
        return {}
    a, b = first["metrics"][series], last["metrics"][series]
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def hit_ratio(samples: list[dict], start: float, end: float) -> float | None:
    d = metric_delta(samples, start, end, "ray_lorafleet_adapter_requests_total")
    hits, misses = d.get("hit", 0.0), d.get("miss", 0.0)
    return hits / (hits + misses) if hits + misses > 0 else None


def replicas_range(samples: list[dict], start: float, end: float) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for s in samples:
        if start <= s["t"] <= end:
            for k, v in s.get("replicas", {}).items():
                lo, hi = out.get(k, (v, v))
                out[k] = (min(lo, v), max(hi, v))
    return out


# -- plots -------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(searches: dict, slo_ms: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for target, s in searches.items():
        st = TARGET_STYLE.get(target, {})
        xs = [x["rate_rps"] for x in s["stages"]]
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ys = [_num(x["stats"][f"{q}_ms"]) for x in s["stages"]]
            ax.plot(xs, ys, marker=marker, ls=st.get("ls", "-"), color=st.get("color"), alpha=0.5 + 0.25 * (q == "p95"),
                    label=f"{target} {q}")  # fmt: skip
    ax.axhline(slo_ms, color="red", lw=1, ls=":", label=f"SLO p95 {slo_ms:.0f} ms")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(searches: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax2 = ax.twinx()
    top = 0.0
    for target, s in searches.items():
        st = TARGET_STYLE.get(target, {})
        xs = [x["rate_rps"] for x in s["stages"]]
        top = max([top, *xs])
        ax.plot(xs, [x["stats"]["throughput_rps"] for x in s["stages"]], marker="o", ls=st.get("ls"),
                color=st.get("color"), label=f"{target} requests/s")  # fmt: skip
        ax.plot(xs, [x["stats"]["images_per_s"] for x in s["stages"]], marker="x", ls=st.get("ls"),
                color=st.get("color"), alpha=0.5, label=f"{target} images/s")  # fmt: skip
        ax2.bar(xs, [100 * _num(x["stats"]["error_rate"]) for x in s["stages"]], width=max(0.05, 0.02 * top),
                color=st.get("color"), alpha=0.25)  # fmt: skip
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="served = offered")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("completed per second")
    ax2.set_ylabel("errors (% of requests, bars)")
    ax2.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Throughput and error rate against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(run: dict, phase_records: dict, path: Path) -> None:
    plt = _plt()
    t0 = run["started"]
    samples = run.get("samples", [])
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    ax = axes[0]
    bin_s = 2.0
    for phase in run["phases"]:
        st = TARGET_STYLE.get(phase["target"], {})
        stages_doc = _read_json(path.parent / phase["dir"] / "stages.json")
        stages = stages_doc.get("stages", [])
        recs = phase_records.get(phase["name"], [])
        for i, stage in enumerate(stages):
            # Completions per second while this stage ran and drained (stages of two targets interleave).
            end = stage["end"] + stage.get("drain_s", 0.0)
            ok, failed = {}, {}
            for r in recs:
                done = r["t"] + r["ms"] / 1000
                if stage["start"] <= r["t"] < stage["end"] and done <= end + 1:
                    b = int((done - t0) // bin_s)
                    (ok if r["ok"] else failed)[b] = (ok if r["ok"] else failed).get(b, 0) + 1
            xs = list(range(int((stage["start"] - t0) // bin_s), int((end - t0) // bin_s) + 1))
            centres = [bin_s * (x + 0.5) for x in xs]
            label = phase["name"] if i == 0 else None
            ax.plot(centres, [ok.get(x, 0) / bin_s for x in xs], color=st.get("color"), lw=1, label=label)
            if failed:
                ax.plot(centres, [failed.get(x, 0) / bin_s for x in xs], color="red", lw=0.8)
            ax.hlines(
                stage["rate_rps"], stage["start"] - t0, stage["end"] - t0, color=st.get("color"), lw=3, alpha=0.35
            )
            for axx in axes:
                axx.axvspan(stage["start"] - t0, end - t0, color=st.get("color", "grey"), alpha=0.07)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.set_ylabel("completed/s\n(bars: offered,\nred: failed)")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    keys = sorted({k for s in samples for k in s.get("replicas", {})})
    for k in keys:
        pts = [(s["t"] - t0, s["replicas"][k]) for s in samples if k in s.get("replicas", {})]
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=k)
    ax.set_ylabel("replicas")
    if keys:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    ax = axes[2]
    xs, ys = [], []
    series = "ray_lorafleet_adapter_requests_total"
    with_metric = [s for s in samples if series in s["metrics"]]
    for a, b in zip(with_metric, with_metric[1:], strict=False):
        hits = b["metrics"][series].get("hit", 0) - a["metrics"][series].get("hit", 0)
        misses = b["metrics"][series].get("miss", 0) - a["metrics"][series].get("miss", 0)
        if hits + misses > 0:
            xs.append(b["t"] - t0)
            ys.append(hits / (hits + misses))
    ax.plot(xs, ys, ".", color="tab:green", label="adapter cache hit ratio (per sample)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("hit ratio")
    ax3 = ax.twinx()
    q = [(s["t"] - t0, s["metrics"]["ray_lorafleet_queue_depth_images"].get("", 0)) for s in samples
         if "ray_lorafleet_queue_depth_images" in s["metrics"]]  # fmt: skip
    if q:
        ax3.plot([p[0] for p in q], [p[1] for p in q], color="tab:purple", lw=0.8, label="lorafleet queued images")
        ax3.set_ylabel("queued images")
        ax3.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_xlabel("seconds since the run started")
    ax.grid(True, alpha=0.3)
    fig.suptitle("Over time: throughput, replicas, adapter cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fairness(fair: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.8 / (1 + len(fair))
    tenants = sorted({t for f in fair.values() for t in f["tenants"]})
    for i, tenant in enumerate(tenants):
        offered = next(f["tenants"][tenant]["offered_share"] for f in fair.values() if tenant in f["tenants"])
        ax.bar(i, 100 * offered, width, color="grey", label="offered" if i == 0 else None)
        for j, (target, f) in enumerate(fair.items(), 1):
            t = f["tenants"].get(tenant)
            if t is None:
                continue
            color = TARGET_STYLE.get(target, {}).get("color")
            ax.bar(i + j * width, 100 * _num(t["image_share"]), width, color=color,
                   label=f"{target}: completed images" if i == 0 else None)  # fmt: skip
            ax2.bar(
                i + (j - 1) * width, _num(t["p95_ms"]), width, color=color, label=f"{target} p95" if i == 0 else None
            )
            ax2.plot(i + (j - 1) * width, _num(t["p50_ms"]), "k_", ms=12)
    for a in (ax, ax2):
        a.set_xticks(range(len(tenants)))
        a.set_xticklabels(tenants)
        a.grid(True, axis="y", alpha=0.3)
        a.legend(fontsize=7)
    ax.set_ylabel("% of load / of completed images")
    ax2.set_ylabel("latency ms (bar p95, tick p50)")
    ax2.set_yscale("log")
    fig.suptitle("Fairness at overload: a flooding tenant and a light one")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def build_report(run_dir: Path) -> dict:
    """Write ``report.md``, the PNGs and ``summary.json`` into ``run_dir``; return the summary."""
    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json")
    args = run.get("args", {})
    machine = run.get("machine", {})
    samples = run.get("samples", [])
    slo_ms = float(args.get("slo_ms", 1000.0))
    phase_records: dict[str, list[dict]] = {}
    phase_docs: dict[str, dict] = {}
    for phase in run.get("phases", []):
        phase_records[phase["name"]] = load_records(run_dir / phase["dir"] / "requests.jsonl")
        phase_docs[phase["name"]] = _read_json(run_dir / phase["dir"] / "stages.json")

    # A scenario phase (one long stage, e.g. many-adapters) has its own section, not a point of the search.
    def kind(p: dict) -> str | None:
        return p.get("kind") or ("fairness" if p["name"].endswith("-fairness") else None)

    load_phases = [p for p in run.get("phases", []) if kind(p) not in ("fairness", "alone") and not p.get("scenario")]
    fair_phases = [p for p in run.get("phases", []) if kind(p) == "fairness"]
    alone_phases = [p for p in run.get("phases", []) if kind(p) == "alone"]
    scenarios = {}
    for p in run.get("phases", []):
        if p.get("scenario"):
            from .many_adapters import scenario_report  # it imports this module's helpers

            scenarios[p["scenario"]] = scenario_report(
                p, phase_records[p["name"]], phase_docs[p["name"]], samples, args
            )
    searches = {p["target"]: target_search(phase_docs[p["name"]]) for p in load_phases}
    overall = {
        p["name"]: phase_overall(phase_records[p["name"]], phase_docs[p["name"]].get("stages", []))
        for p in run.get("phases", [])
    }
    for p in run.get("phases", []):
        # lorafleet's adapter metrics say nothing about the baseline, which holds every adapter all along.
        lorafleet = p["target"] == "lorafleet"
        overall[p["name"]]["adapter_hit_ratio"] = hit_ratio(samples, p["start"], p["end"]) if lorafleet else None
        overall[p["name"]]["replicas"] = {
            k: v for k, v in replicas_range(samples, p["start"], p["end"]).items() if k.startswith(p["target"] + "/")
        }
    per_model = {}
    for p in run.get("phases", []):
        stages = models_by_stage(phase_records[p["name"]], phase_docs[p["name"]].get("stages", []))
        if stages:
            per_model[p["name"]] = {"all": overall[p["name"]].get("models", {}), "stages": stages}
    fair = {p["target"]: fairness(phase_records[p["name"]], phase_docs[p["name"]]) for p in fair_phases}
    prefix = args.get("adapter_prefix", "lt-style-")
    for p in fair_phases:
        stage = phase_docs[p["name"]]["stages"][0]
        fair[p["target"]]["by_popularity"] = latency_by_popularity(phase_records[p["name"]], stage, prefix)
    alone = {p["target"]: fairness(phase_records[p["name"]], phase_docs[p["name"]]) for p in alone_phases}
    isolated = {p["target"]: isolation(fair[p["target"]], alone.get(p["target"]), p) for p in fair_phases}
    for target, x in isolated.items():
        fair[target]["isolation"] = x
        if target in alone:
            fair[target]["alone"] = alone[target]

    headline: dict = {"slo_ms": slo_ms}
    lf, base = searches.get("lorafleet"), searches.get("baseline")
    if lf:
        headline["lorafleet_sustainable_rps"] = lf["sustainable_rps"]
        headline["lorafleet_images_per_s"] = lf["at_sustainable"]["images_per_s"] if lf["at_sustainable"] else None
    if base:
        headline["baseline_sustainable_rps"] = base["sustainable_rps"]
        headline["baseline_images_per_s"] = base["at_sustainable"]["images_per_s"] if base["at_sustainable"] else None
    if lf and base:
        if lf["sustainable_rps"] and base["sustainable_rps"]:
            headline["sustainable_rps_ratio"] = lf["sustainable_rps"] / base["sustainable_rps"]
            headline["sustainable_images_per_s_ratio"] = (
                lf["at_sustainable"]["images_per_s"] / base["at_sustainable"]["images_per_s"]
                if base["at_sustainable"]["images_per_s"]
                else None
            )
        rate, both = common_rate(lf["stages"], base["stages"])
        if rate is not None:
            a, b = _stage_at(lf["stages"], rate)["stats"], _stage_at(base["stages"], rate)["stats"]
            headline["p95_common_rate_rps"] = rate
            headline["p95_common_rate_both_meet_slo"] = both
            headline["lorafleet_p95_ms_at_common"] = a["p95_ms"]
            headline["baseline_p95_ms_at_common"] = b["p95_ms"]
            headline["p95_ratio_baseline_over_lorafleet"] = (
                b["p95_ms"] / a["p95_ms"] if a["p95_ms"] and b["p95_ms"] else None
            )
    for target, f in fair.items():
        for tenant, t in f["tenants"].items():
            headline[f"fairness_{target}_{tenant}_image_share"] = t["image_share"]
        if "isolation" in f:
            headline[f"isolation_{target}_passed"] = f["isolation"]["passed"]
            headline[f"isolation_{target}_p95_ratio"] = f["isolation"]["p95_ratio"]

    plots = []
    if searches:
        plot_latency(searches, slo_ms, run_dir / "latency_vs_load.png")
        plot_throughput(searches, run_dir / "throughput_vs_load.png")
        plots += ["latency_vs_load.png", "throughput_vs_load.png"]
    if run.get("phases"):
        plot_timeline(run, phase_records, run_dir / "timeline.png")
        plots.append("timeline.png")
    if fair:
        plot_fairness(fair, run_dir / "fairness.png")
        plots.append("fairness.png")

    # a scenario run at a given --rate has no search and no fairness run: no summary table to show
    summary_md = _summary_table(headline, searches, fair, overall, load_phases) if searches or fair else ""
    summary_md += "".join("\n" + s["markdown"] for s in scenarios.values())
    md = _markdown(run, machine, args, searches, fair, overall, summary_md, slo_ms, plots, per_model)
    (run_dir / "report.md").write_text(md)
    summary = {
        "headline": headline,
        "machine": machine,
        "phases": overall,
        "searches": {k: {kk: v[kk] for kk in ("sustainable_rps", "at_sustainable")} for k, v in searches.items()},
        "fairness": fair,
        "models": per_model,
        "scenarios": {k: {kk: v for kk, v in x.items() if kk != "markdown"} for k, x in scenarios.items()},
        "plots": plots,
        "summary_md": summary_md,
    }
    (run_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=1))
    return summary


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one letter per column: l(eft), r(ight), c(entre)."""
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary_table(headline: dict, searches: dict, fair: dict, overall: dict, load_phases: list[dict]) -> str:
    h = headline
    lf, base = searches.get("lorafleet"), searches.get("baseline")

    def at(s, key, digits=1):
        return _fmt(s["at_sustainable"][key], digits) if s and s["at_sustainable"] else "n/a"

    rows = []
    if lf:
        rows.append([
            f"sustainable load at p95 ≤ {h['slo_ms']:.0f} ms (req/s offered)",
            _fmt(h.get("lorafleet_sustainable_rps"), 2),
            _fmt(h.get("baseline_sustainable_rps"), 2),
            f"**{_fmt(h.get('sustainable_rps_ratio'), 2, '×')}**",
        ])  # fmt: skip
        rows.append([
            "images/s completed at that load",
            at(lf, "images_per_s", 2),
            at(base, "images_per_s", 2),
            _fmt(h.get("sustainable_images_per_s_ratio"), 2, "×"),
        ])  # fmt: skip
        rows.append([
            "p50 / p95 at that load (ms)",
            f"{at(lf, 'p50_ms', 0)} / {at(lf, 'p95_ms', 0)}",
            f"{at(base, 'p50_ms', 0)} / {at(base, 'p95_ms', 0)}",
            "",
        ])  # fmt: skip
    if "p95_common_rate_rps" in h:
        rows.append([
            f"p95 at {h['p95_common_rate_rps']:.2f} req/s on both (ms)",
            _fmt(h["lorafleet_p95_ms_at_common"]),
            _fmt(h["baseline_p95_ms_at_common"]),
            f"**{_fmt(h.get('p95_ratio_baseline_over_lorafleet'), 2, '×')}** lower",
        ])  # fmt: skip
    for p in load_phases:
        hr = overall[p["name"]].get("adapter_hit_ratio")
        if p["target"] == "lorafleet" and hr is not None:
            rows.append([f"adapter cache hit ratio ({p['name']})", _fmt(100 * hr, 1, "%"), "all preloaded", ""])
    for target, f in fair.items():
        shares = ", ".join(
            f"{name} {_fmt(100 * t['offered_share'])}% → {_fmt(100 * _num(t['image_share']))}% "
            f"(p50 {_fmt(t['p50_ms'])}, p95 {_fmt(t['p95_ms'])} ms)"
            for name, t in f["tenants"].items()
        )
        what = f"fairness at {f['rate_rps']:.2f} req/s: share of load offered → of images completed"
        rows.append([what, shares, "", ""] if target == "lorafleet" else [what, "", shares, ""])
        if "isolation" in f:
            cell = _isolation_cell(f["isolation"])
            what = "isolation (#21): light tenant served in full, p95 ≤ 2× alone"
            rows.append([what, cell, "", ""] if target == "lorafleet" else [what, "", cell, ""])
    if base is None and "baseline" not in fair:  # lorafleet alone (--no-baseline)
        return _table(["figure", "lorafleet"], [row[:2] for row in rows])
    return _table(["figure", "lorafleet", "baseline (diffusers, one at a time)", "ratio"], rows)


def _isolation_cell(x: dict) -> str:
    verdict = "**PASS**" if x["passed"] else "**FAIL**"
    refused = x["light_refused"]
    unsent = f", {x['light_unsent']} arrivals unsent (its client's users all waiting)" if x.get("light_unsent") else ""
    return (
        f"{verdict}: {x['light_requests'] - x['light_failed']}/{x['light_requests']} served "
        f"({refused.get('429', 0)}× 429, {refused.get('503', 0)}× 503{unsent}), p95 {_fmt(x['p95_ms'])} ms vs "
        f"{_fmt(x['alone_p95_ms'])} ms alone = {_fmt(x['p95_ratio'], 2, '×')}"
    )


def _stage_rows(target: str, phase: str, tenants: dict) -> list[list[str]]:
    rows = []
    for name, t in tenants.items():
        times = t.get("stage_ms", {})
        keys = [k for k in STAGE_KEYS if k in times] + sorted(k for k in times if k not in STAGE_KEYS)
        cells = ", ".join(f"{k[:-3]} {_fmt(times[k]['p50'])} / {_fmt(times[k]['p95'])}" for k in keys)
        rows.append([target, phase, name, _fmt(t["p50_ms"]), _fmt(t["p95_ms"]), cells or "–"])
    return rows


STAGE_KEYS = ("admission_ms", "encode_ms", "queue_ms", "denoise_ms", "decode_ms", "other_ms")


def _model_rows(phase: str, stage: str, by_model: dict) -> list[list[str]]:
    return [
        [
            phase,
            stage,
            model,
            str(x["requests"]),
            str(x["failed"]),
            _fmt(100 * _num(x["error_rate"]), 1, "%"),
            _fmt(x["p50_ms"]),
            _fmt(x["p95_ms"]),
            _fmt(x["p99_ms"]),
            _fmt(x["images_per_s"], 2),
        ]  # fmt: skip
        for model, x in by_model.items()
    ]


def _markdown(run, machine, args, searches, fair, overall, summary_md, slo_ms, plots, per_model=None) -> str:
    v = machine.get("versions", {})
    mix = run.get("models") or []
    if mix:
        total = sum(m["weight"] for m in mix)
        model = "Models " + ", ".join(f"`{m['name']}` ({100 * m['weight'] / total:.0f}% of requests)" for m in mix)
        adapters = f"{args.get('adapters')} synthetic adapters per model"
    else:
        model = f"Model `{run.get('model_name', '?')}`"
        adapters = f"{args.get('adapters')} synthetic adapters"
    out = [
        "# lorafleet load test",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, {machine.get('memory_gib', '?')} GiB, "
        f"no GPU; {machine.get('platform', '')}; Python {machine.get('python', '')}, torch {v.get('torch')}, "
        f"Ray {v.get('ray')}, diffusers {v.get('diffusers')}, locust {v.get('locust')}. Load average at start "
        f"{_loadavg(machine.get('loadavg_start'))}, at end {_loadavg(machine.get('loadavg_end'))} (other work on "
        f"the machine makes the figures noisy). {model}; {adapters} "
        f"(rank {args.get('adapter_rank')}); SLO: p95 ≤ {slo_ms:.0f} ms and at most 1% errors.",
        "",
        "## Summary",
        "",
        summary_md,
    ]
    if "baseline" in searches:
        out.append(
            "Ratios: lorafleet ÷ baseline for throughput, baseline ÷ lorafleet for p95 (above 1: lorafleet better). "
        )
    if args.get("stages"):
        out.append(
            f"Fixed stages `{args['stages']}` (rate:seconds), the first {args.get('warmup_s')} s of each left out."
        )
    elif searches:
        out.append(
            "Sustainable load: the highest offered rate whose stage met the SLO (saturation search: rates grow "
            f"×{args.get('growth')} from {args.get('start_rps')} req/s, then bisect; {args.get('stage_s')} s stages, "
            f"the first {args.get('warmup_s')} s left out; lorafleet's and the baseline's stages alternate)."
        )
    out.append("")
    out += [f"![{plot[:-4]}]({plot})\n" for plot in plots]
    for target, s in searches.items():
        rows = []
        for st in s["stages"]:
            x = st["stats"]
            rows.append([
                f"{st['rate_rps']:.2f}", f"{x['sent_rps']:.2f}", f"{x['throughput_rps']:.2f}",
                f"{x['images_per_s']:.2f}", _fmt(x["p50_ms"]), _fmt(x["p95_ms"]), _fmt(x["p99_ms"]),
                _fmt(100 * _num(x["error_rate"]), 1, "%"), "yes" if st["passed"] else "no",
            ])  # fmt: skip
        header = ["offered req/s", "sent req/s", "done req/s", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
        out += [f"## {target}: stages", "", _table([*header, "meets SLO"], rows, "r" * 8 + "c")]
    rows = []
    for name, o in overall.items():
        reps = ", ".join(f"{k.split('/')[-1]} {lo}–{hi}" for k, (lo, hi) in sorted(o.get("replicas", {}).items()))
        hr = o.get("adapter_hit_ratio")
        rows.append([
            name, str(o.get("requests", 0)), str(o.get("failed", 0)), str(o.get("images", 0)), _fmt(o.get("p50_ms")),
            _fmt(o.get("p95_ms")), _fmt(100 * hr, 1, "%") if hr is not None else "n/a", reps or "n/a",
        ])  # fmt: skip
    header = ["phase", "requests", "failed", "images", "p50 ms", "p95 ms", "adapter hit ratio", "replicas (min–max)"]
    out += ["## Phases", "", _table(header, rows, "lrrrrrrl")]
    if per_model:
        rows = []
        for phase, m in per_model.items():
            for st in m["stages"]:
                rows += _model_rows(phase, f"{st['rate_rps']:.2f} req/s", st["models"])
            if len(m["stages"]) > 1:
                rows += _model_rows(phase, "all stages", m["all"])
        header = ["phase", "offered", "model", "requests", "failed", "errors", "p50 ms", "p95 ms", "p99 ms"]
        out += [
            "## Per model",
            "",
            "Each base model's requests (started in a stage's measured window; latency of the successful ones; "
            "images/s completed in the window). The offered rate is shared by the models' `--models` weights.",
            "",
            _table([*header, "images/s"], rows, "lll" + "r" * 7),
        ]
    if fair:
        rows = []
        for target, f in fair.items():
            for name, t in f["tenants"].items():
                rows.append([
                    target, name, f"{100 * t['offered_share']:.0f}%", f"{t['offered_rps']:.2f}", str(t["requests"]),
                    str(t["failed"]), str(t["images"]), _fmt(100 * _num(t["image_share"]), 1, "%"),
                    f"{t['images_per_s']:.2f}", _fmt(t["p50_ms"]), _fmt(t["p95_ms"]), _fmt(t["queue_p50_ms"]),
                ])  # fmt: skip
        header = ["target", "tenant", "offered share", "offered req/s", "requests", "failed", "images"]
        header += ["share of images", "images/s", "p50 ms", "p95 ms", "denoiser queue p50 ms"]
        if args.get("fairness_tenants"):
            what = f"Tenants `{args['fairness_tenants']}` at {args.get('overload')}× the target's capacity"
        else:
            what = (
                f"A heavy tenant at {args.get('overload')}× the target's capacity and a light one at "
                f"{args.get('light_load')}× (below its fair share, half at equal weights)"
            )
        capacity = "`--capacity-rps`" if args.get("capacity_rps") else "the lowest rate at which it missed the SLO"
        out += [
            "## Fairness",
            "",
            f"{what}; capacity: {capacity}.",
            "",
            _table(header, rows, "ll" + "r" * 10),
            "Failed requests at overload are 503 `overloaded` (lorafleet bounds each tenant's queue) or client "
            "timeouts; the baseline queues without bound, first come first served. The denoiser queue time is "
            "lorafleet's own `timings.queue_ms` (native API requests).",
            "",
        ]
        iso = {target: f["isolation"] for target, f in fair.items() if "isolation" in f}
        if iso:
            rows = [
                [target, x["light_tenant"], _fmt(x["capacity_rps"], 2), _fmt(x["light_offered_rps"], 2),
                 "yes" if x["below_fair_share"] else "**no**", _isolation_cell(x)]
                for target, x in iso.items()
            ]  # fmt: skip
            out += [
                "## Isolation (issue 21, item 4)",
                "",
                "The light tenant under the flood against itself alone at the same rate (`<target>-alone`): PASS "
                "when every request of it was served (no 429/503) and its p95 is at most "
                f"{next(iter(iso.values()))['ratio_limit']:g}× its p95 alone.",
                "",
                _table(
                    ["target", "light tenant", "capacity req/s", "light req/s", "below its fair share", "check"],
                    rows,
                    "llrrll",
                ),  # fmt: skip
            ]
            rows = []
            for target, f in fair.items():
                if "alone" in f:
                    rows += _stage_rows(target, "alone", f["alone"]["tenants"])
                rows += _stage_rows(target, "flood", f["tenants"])
            out += [
                "Where the time goes (successful native requests, p50 / p95 ms per stage): lorafleet's `timings` "
                "(`encode`: the TextEncoder's batch wait and work, `queue`: the Denoiser's fair queue, `denoise`, "
                "`decode`: the VAE's batch wait and work) and `other`: the latency no server timing covers.",
                "",
                _table(["target", "phase", "tenant", "p50 ms", "p95 ms", "stages p50 / p95 ms"], rows, "lllrrl"),
            ]
        rows = []
        for target, f in fair.items():
            for tenant, buckets in sorted(f.get("by_popularity", {}).items()):
                cells = []
                for b in POPULARITY_BUCKETS:
                    x = buckets.get(b)
                    cells.append(f"{x['requests']}: {_fmt(x['p50_ms'])} / {_fmt(x['p95_ms'])}" if x else "–")
                rows.append([target, tenant, *cells])
        out += [
            "Latency by adapter popularity in the fairness run (requests: p50 / p95 ms). Adapters outside the "
            "few most popular are rarely resident in a replica's adapter slots and must be loaded into one.",
            "",
            _table(["target", "tenant", *POPULARITY_BUCKETS], rows, "llrrr"),
        ]
    out += [
        "## Arguments",
        "",
        "```",
        json.dumps({k: v for k, v in args.items() if v is not None}, indent=1),
        "```",
        "",
    ]
    return "\n".join(out)


def _loadavg(la) -> str:
    return "n/a" if not la else " / ".join(f"{x:.1f}" for x in la)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    summary = build_report(Path(args.run_dir))
    print(summary["summary_md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
