"""The chaos soak's figures, from its op records and fault timeline: pure functions.

A *fault* is ``{"name", "kind", "start", "end", ...}`` in wall-clock seconds: ``start`` when it was
injected, ``end`` when the system was whole again (the replacement replica running, S3 back).
Around each fault three windows, by the ops' *start* times: ``before`` (from the previous
fault's end, or the traffic's start, to this one's start), ``during`` (start to end) and
``after`` (end to the next fault's start, or the traffic's end). Latency percentiles are those
of the successful synchronous requests (``generate``, ``disconnect`` answered in time) started
in the window; jobs (create to final state, at the polling interval's resolution) are reported apart.
"""

from __future__ import annotations

import math
from collections import Counter

from .soak_client import OUTCOMES
from .stats import percentile

SYNC_KINDS = ("generate", "disconnect")
JOB_KINDS = ("job", "job_cancel")


def _ms(values: list[float], q: float) -> float | None:
    x = percentile(values, q)
    return None if math.isnan(x) else round(x, 1)


def window_stats(ops: list[dict], start: float, end: float) -> dict:
    """Ops started in ``[start, end)``: counts by outcome, failures by code, latency percentiles."""
    inside = [op for op in ops if start <= op["t"] < end]
    sync_ok = [op["ms"] for op in inside if op["kind"] in SYNC_KINDS and op["outcome"] == "ok"]
    job_ok = [op["ms"] for op in inside if op["kind"] in JOB_KINDS and op["outcome"] == "ok"]
    return {
        "start": start,
        "end": end,
        "seconds": round(end - start, 1),
        "ops": len(inside),
        "outcomes": {o: sum(op["outcome"] == o for op in inside) for o in OUTCOMES},
        "failed_codes": dict(Counter(op["code"] for op in inside if op["outcome"] == "failed")),
        "p50_ms": _ms(sync_ok, 50),
        "p95_ms": _ms(sync_ok, 95),
        "jobs_p95_ms": _ms(job_ok, 95),
    }


def fault_windows(ops: list[dict], faults: list[dict], traffic_start: float, traffic_end: float) -> list[dict]:
    """Each fault with its ``before`` / ``during`` / ``after`` windows (see the module docstring)."""
    out = []
    for i, fault in enumerate(faults):
        prev_end = faults[i - 1]["end"] if i else traffic_start
        next_start = faults[i + 1]["start"] if i + 1 < len(faults) else traffic_end
        end = fault["end"] if fault.get("end") is not None else next_start
        out.append(
            {
                **fault,
                "before": window_stats(ops, prev_end, fault["start"]),
                "during": window_stats(ops, fault["start"], end),
                "after": window_stats(ops, end, max(end, next_start)),
            }
        )
    return out


def summarize(ops: list[dict], faults: list[dict], traffic_start: float, traffic_end: float, **extra) -> dict:
    """The soak's summary: totals, each fault's windows, and the verdict (``passed``: nothing lost, hung or unclean)."""
    totals = {o: sum(op["outcome"] == o for op in ops) for o in OUTCOMES}
    unclean_answers = [a for op in ops for a in op.get("unclean_answers") or []]
    problems = {
        "lost": [_brief(op, traffic_start) for op in ops if op["outcome"] == "lost"],
        "hung": [_brief(op, traffic_start) for op in ops if op["outcome"] == "hung"],
        "unclean": [_brief(op, traffic_start) for op in ops if op["outcome"] == "unclean"],
        "unclean_answers": unclean_answers,
        "faults_not_recovered": [f["name"] for f in faults if f.get("end") is None],
    }
    passed = not any(problems.values())
    return {
        "passed": passed,
        "traffic_start": traffic_start,
        "traffic_end": traffic_end,
        "sent": len(ops),
        "succeeded": totals["ok"],
        "failed_clean": totals["failed"],
        "cancelled": totals["cancelled"],
        "lost": totals["lost"],
        "hung": totals["hung"],
        "unclean": totals["unclean"] + len(unclean_answers),
        "outcomes": totals,
        "by_kind": {
            k: {o: sum(op["kind"] == k and op["outcome"] == o for op in ops) for o in OUTCOMES} for k in _kinds(ops)
        },
        "failed_codes": dict(Counter(op["code"] for op in ops if op["outcome"] == "failed")),
        "overall": window_stats(ops, traffic_start, traffic_end + 1e-6),
        "faults": fault_windows(ops, faults, traffic_start, traffic_end),
        "problems": problems,
        **extra,
    }


def _kinds(ops: list[dict]) -> list[str]:
    return sorted({op["kind"] for op in ops})


def _brief(op: dict, traffic_start: float) -> dict:
    """An op for the problem lists, its start and end in seconds since the traffic started."""
    keep = ("id", "kind", "request_id", "job_id", "outcome", "status", "code", "detail")
    out = {k: op.get(k) for k in keep}
    out["start_s"] = round(op["t"] - traffic_start, 1)
    out["end_s"] = None if op.get("ms") is None else round(op["t"] + op["ms"] / 1000.0 - traffic_start, 1)
    return out


def _share(s: dict) -> str:
    if not s.get("capacity_rps"):
        return " (a given rate)"
    return f" ({s['load_share']:.0%} of a measured capacity of {s['capacity_rps']:.2f} ops/s of this mix)"


def _fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def markdown(summary: dict) -> str:
    """The summary as a short markdown report."""
    s = summary
    lines = [
        f"# Chaos soak: {'PASSED' if s['passed'] else 'FAILED'}",
        "",
        f"{s.get('machine_line', '')}".strip(),
        "",
        f"Offered {s.get('rate_rps') or 0:.2f} ops/s{_share(s)} for {s.get('traffic_s') or 0:.0f} s; "
        f"mix {s.get('mix', '')}.",
        "",
        "| sent | succeeded | failed, clean error | cancelled by the client | lost | hung | unclean |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['sent']} | {s['succeeded']} | {s['failed_clean']} | {s['cancelled']} | {s['lost']} | {s['hung']} "
        f"| {s['unclean']} |",
        "",
        "Failures by code: "
        + (", ".join(f"`{c}` {n}" for c, n in sorted(s["failed_codes"].items())) or "none")
        + f". Arrivals skipped (every client busy): {s.get('skipped_arrivals', 0)}.",
        "",
        "p95 latency of successful synchronous requests (ms), by start time, around each fault:",
        "",
        "| fault | at (s) | until whole (s) | p95 before | p95 during | p95 after | failed during (codes) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    t0 = s.get("traffic_start", 0.0)
    for f in s["faults"]:
        codes = ", ".join(f"{c} {n}" for c, n in sorted(f["during"]["failed_codes"].items())) or "–"
        recovered = "not recovered" if f.get("end") is None else f"{f['end'] - f['start']:.1f}"
        lines.append(
            f"| {f['name']} | {f['start'] - t0:.0f} | {recovered} | {_fmt_ms(f['before']['p95_ms'])} "
            f"| {_fmt_ms(f['during']['p95_ms'])} | {_fmt_ms(f['after']['p95_ms'])} | {codes} |"
        )
    o = s["overall"]
    lines += ["", f"Whole run: p50 {_fmt_ms(o['p50_ms'])} ms, p95 {_fmt_ms(o['p95_ms'])} ms; jobs p95 "
              f"{_fmt_ms(o['jobs_p95_ms'])} ms (create to final state)."]  # fmt: skip
    server = s.get("server_after")
    if server:
        lines += ["", f"Server after the run: {server}."]
    p = s["problems"]
    for name in p:
        if p[name]:
            lines += ["", f"**{name}** ({len(p[name])}):", ""]
            lines += [f"- `{item}`" for item in p[name][:20]]
            if len(p[name]) > 20:
                lines.append(f"- … {len(p[name]) - 20} more in summary.json")
    return "\n".join(lines) + "\n"
