"""Request records, per-stage summaries and the saturation search: pure functions, shared by the
locust process (which steers the search) and the report (which recomputes everything from the logs).

A *record* is one request as the client saw it, a JSON line in ``requests.jsonl``::

    {"t": 1732712345.12, "ms": 184.2, "ok": true, "status": 200, "tenant": "acme",
     "api": "native", "images": 1, "adapters": ["lt-style-000"], "model": null, "error": null}

``t`` is the wall-clock start, ``ms`` the latency, ``model`` the base model asked for
(null: none, the server's default; logs from before models could be mixed lack it). A *stage* is a window of
constant offered rate: requests *started* after its warm-up count for its
latency percentiles and error rate; requests *completed* inside the window
give its throughput (a backlog finishing after the window does not inflate it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; NaN for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class StageStats:
    """What one stage measured (latencies in ms, rates per second of the measured window)."""

    rate_rps: float  # offered
    window_s: float
    requests: int  # started in the window
    sent_rps: float  # requests started in the window, per second (below rate_rps: client saturated)
    ok: int
    failed: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float  # successful requests completed in the window, per second
    images_per_s: float
    images: int  # images of the requests started in the window that succeeded

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def summarize(records: Iterable[dict], start: float, end: float, rate_rps: float, warmup_s: float = 0.0) -> StageStats:
    """Summarise the stage ``[start + warmup_s, end)`` (wall-clock seconds)."""
    t0 = start + warmup_s
    if end <= t0:
        raise ValueError(f"stage window is empty: start {start} + warm-up {warmup_s} >= end {end}")
    window = end - t0
    started = []
    completed_ok = []
    for r in records:
        if t0 <= r["t"] < end:
            started.append(r)
        if r["ok"] and t0 <= r["t"] + r["ms"] / 1000.0 < end:
            completed_ok.append(r)
    ok = [r for r in started if r["ok"]]
    lat = [r["ms"] for r in ok]
    return StageStats(
        rate_rps=rate_rps,
        window_s=window,
        requests=len(started),
        sent_rps=len(started) / window,
        ok=len(ok),
        failed=len(started) - len(ok),
        error_rate=(len(started) - len(ok)) / len(started) if started else math.nan,
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        p99_ms=percentile(lat, 99),
        throughput_rps=len(completed_ok) / window,
        images_per_s=sum(r["images"] for r in completed_ok) / window,
        images=sum(r["images"] for r in ok),
    )


def summarize_by_model(records: Iterable[dict], start: float, end: float, warmup_s: float = 0.0) -> dict[str, dict]:
    """``summarize`` per base model (the records' ``model``), over the same window; ``{}`` when no record
    names a model (traffic that does not mix models). The offered rate of a model is not known here
    (``rate_rps`` None): its share of the stage's rate is its ``--models`` weight.
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("model") is not None:
            groups.setdefault(r["model"], []).append(r)
    return {model: summarize(rs, start, end, math.nan, warmup_s).to_dict() for model, rs in sorted(groups.items())}


def apportion(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` whole items by ``shares`` (largest remainder): the parts always sum to ``total``.

    >>> apportion(7, [0.5, 0.25, 0.125, 0.125])
    [3, 2, 1, 1]
    """
    if total < 0 or not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"cannot apportion {total} by {shares}")
    exact = [total * s / sum(shares) for s in shares]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def parse_stages(spec: str) -> list[tuple[float, float]]:
    """``"2:20,4:20"`` -> [(2.0 rps, 20.0 s), (4.0, 20.0)]."""
    out = []
    for item in spec.split(","):
        if not item.strip():
            continue
        rate, sep, seconds = item.partition(":")
        if not sep:
            raise ValueError(f"bad stage {item!r} in {spec!r}: expected RATE_RPS:SECONDS")
        out.append((float(rate), float(seconds)))
    if not out or any(r <= 0 or s <= 0 for r, s in out):
        raise ValueError(f"stages {spec!r}: need at least one stage, every rate and duration > 0")
    return out


def meets_slo(stats: StageStats, slo_ms: float, max_error_rate: float) -> bool:
    """A stage is sustained if it completed requests, its p95 is within the SLO and few requests failed."""
    return stats.ok > 0 and stats.p95_ms <= slo_ms and stats.error_rate <= max_error_rate


class SaturationSearch:
    """Find the highest offered rate that meets the SLO: grow geometrically, then bisect.

    Rates tried while growing form the ladder ``start * growth**k``, the same for every
    target of a run, so two targets share comparable rates. After the first failure the
    search bisects (geometric midpoint) between the highest passing and the lowest failing
    rate until they are within ``resolution`` of each other, or ``max_stages`` are spent.

    >>> s = SaturationSearch(start_rps=2, growth=2, resolution=0.2, max_stages=6)
    >>> s.next_rate()
    2.0
    >>> s.record(2.0, True); s.next_rate()
    4.0
    >>> s.record(4.0, False); round(s.next_rate(), 3)
    2.828
    """

    def __init__(
        self,
        start_rps: float,
        growth: float = 1.5,
        resolution: float = 0.15,
        max_stages: int = 8,
        min_rps: float = 0.1,
        max_rps: float = 1000.0,
    ):
        if start_rps <= 0 or growth <= 1 or resolution <= 0 or max_stages < 1 or not 0 < min_rps <= start_rps:
            raise ValueError(
                f"bad search: start_rps={start_rps} (> 0), growth={growth} (> 1), resolution={resolution} (> 0), "
                f"max_stages={max_stages} (>= 1), min_rps={min_rps} (0 < min_rps <= start_rps)"
            )
        self.start_rps = float(start_rps)
        self.growth = growth
        self.resolution = resolution
        self.max_stages = max_stages
        self.min_rps = min_rps
        self.max_rps = max(max_rps, start_rps)
        self.results: list[tuple[float, bool]] = []

    def record(self, rate: float, passed: bool) -> None:
        self.results.append((float(rate), bool(passed)))

    @property
    def sustainable_rps(self) -> float | None:
        """The highest passing rate below every failing rate above it (None: nothing passed)."""
        passed = [r for r, ok in self.results if ok]
        return max(passed) if passed else None

    def _bounds(self) -> tuple[float | None, float | None]:
        lo = self.sustainable_rps
        failed = [r for r, ok in self.results if not ok and (lo is None or r > lo)]
        return lo, (min(failed) if failed else None)

    def next_rate(self) -> float | None:
        if len(self.results) >= self.max_stages:
            return None
        if not self.results:
            return self.start_rps
        lo, hi = self._bounds()
        tried = {round(r, 6) for r, _ in self.results}
        if hi is None:  # still growing
            nxt = lo * self.growth
            if nxt > self.max_rps * (1 + 1e-9):
                return None if round(self.max_rps, 6) in tried else self.max_rps
            return nxt
        if lo is None:  # even the lowest rate failed: step down
            nxt = hi / self.growth
            return nxt if nxt >= self.min_rps else None
        if hi / lo <= 1 + self.resolution:
            return None
        return math.sqrt(lo * hi)

    def ladder(self, k: int) -> float:
        return self.start_rps * self.growth**k
