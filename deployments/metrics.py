"""lorafleet's Prometheus metrics, exported by Ray next to Ray Serve's own ``ray_serve_*``.

Ray prefixes custom metrics with ``ray_``: ``lorafleet_requests_total`` is
scraped as ``ray_lorafleet_requests_total`` from each node's metrics export
port (``ray start --metrics-export-port``). Units are in the names; label
values that come from users (adapters, tenants) are capped: the first
``MAX_LABEL_VALUES`` distinct values keep their name, the rest are ``other``.
"""

from __future__ import annotations

import hashlib
import threading

from ray.serve.metrics import Counter, Gauge, Histogram

MAX_LABEL_VALUES = 20
LATENCY_MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
STEP_MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


def safe_label(value: str, max_length: int = 64) -> str:
    """A label value as given if it is printable ASCII of at most ``max_length`` characters, else its kind
    (what precedes the first ``:``, if that is plain) and a digest: Ray's metrics take ASCII tags only, and a
    tenant's ``user`` field is whatever the client sent.

    >>> safe_label("user:ann"), safe_label("user:\U00010000")
    ('user:ann', 'user:sha256-118e68564c8d')
    """
    if value.isascii() and value.isprintable() and len(value) <= max_length:
        return value
    kind, sep, _ = value.partition(":")
    prefix = f"{kind}:" if sep and kind.isascii() and kind.isalnum() and len(kind) <= 16 else ""
    return f"{prefix}sha256-{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


class LabelCap:
    """Bounded label cardinality: the first ``limit`` distinct values, then ``"other"``; each one ASCII
    (``safe_label``)."""

    def __init__(self, limit: int = MAX_LABEL_VALUES):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = safe_label(value)
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


def adapter_label(ref: str) -> str:
    """``name@version`` -> ``name``: versions would multiply series without helping a dashboard."""
    return ref.partition("@")[0]


class IngressMetrics:
    def __init__(self):
        self.requests = Counter(
            "lorafleet_requests_total",
            "HTTP requests by route, status code and base model (`-` before the model is known).",
            tag_keys=("route", "status", "model"),
        )
        self.request_latency = Histogram(
            "lorafleet_request_latency_ms",
            "End-to-end latency of successful generation requests, in milliseconds.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("route", "model"),
        )
        self.stage_latency = Histogram(
            "lorafleet_stage_latency_ms",
            "Per-stage latency (encode, queue, denoise, decode), in milliseconds.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("stage", "model"),
        )
        self.images = Counter(
            "lorafleet_images_total",
            "Images generated, by base model (rate() gives images per second).",
            tag_keys=("model",),
        )
        self.replica_failures = Counter(
            "lorafleet_replica_failures_total",
            "Requests whose replica died under them, by attempt (1: retried, 2: answered 503).",
            tag_keys=("attempt", "model"),
        )
        self.registry_ops = Counter(
            "lorafleet_registry_operations_total",
            "Registry operations through the admin API, by operation and outcome.",
            tag_keys=("operation", "outcome"),
        )
        self.registry_errors = Counter(
            "lorafleet_registry_errors_total", "Registry errors by code.", tag_keys=("code",)
        )
        self.request_body_bytes = Counter(
            "lorafleet_request_body_bytes_total",
            "Request body bytes the ingress read, by route (a refused upload adds 0: it is never read).",
            tag_keys=("route",),
        )


class DenoiserMetrics:
    """One Denoiser replica's metrics; every series carries its base model as the ``model`` label."""

    def __init__(self, model: str = ""):
        self.tenants = LabelCap()
        self.adapters = LabelCap()
        self.queue_depth = Gauge(
            "lorafleet_queue_depth_images",
            "Images waiting for a batch slot, per tenant.",
            tag_keys=(
                "tenant",
                "model",
            ),
        )
        self.rows_per_tick = Histogram(
            "lorafleet_rows_per_tick",
            "UNet rows (images x guidance rows) per step.",
            boundaries=ROWS_BUCKETS,
            tag_keys=("model",),
        )
        self.step_latency = Histogram(
            "lorafleet_step_latency_ms",
            "Latency of one batched UNet step, in milliseconds.",
            boundaries=STEP_MS_BUCKETS,
            tag_keys=("model",),
        )
        self.active_images = Gauge("lorafleet_active_images", "Images in the running batch.", tag_keys=("model",))
        self.pending_steps = Gauge(
            "lorafleet_pending_denoise_steps",
            "UNet steps still to run for queued and running images.",
            tag_keys=("model",),
        )
        self.adapter_requests = Counter(
            "lorafleet_adapter_requests_total",
            "Adapter uses by outcome: hit (resident) or miss (loaded for it).",
            tag_keys=(
                "adapter",
                "outcome",
                "model",
            ),
        )
        self.adapter_evictions = Counter(
            "lorafleet_adapter_evictions_total", "Adapters evicted from slots.", tag_keys=("model",)
        )
        self.adapter_load_latency = Histogram(
            "lorafleet_adapter_load_latency_ms",
            "Time to bring an adapter into a slot (registry fetch + copy), in milliseconds.",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model",),
        )
        self.slots_used = Gauge(
            "lorafleet_adapter_slots_used", "Adapter slots holding an adapter.", tag_keys=("model",)
        )
        self.slots_pinned = Gauge(
            "lorafleet_adapter_slots_pinned", "Adapter slots pinned by running requests.", tag_keys=("model",)
        )
        self.slots_total = Gauge("lorafleet_adapter_slots_total", "Adapter slots per replica.", tag_keys=("model",))
        self.adapter_wait = Histogram(
            "lorafleet_adapter_wait_ms",
            "Time an image with adapters waited in the queue for them to become resident, in milliseconds "
            "(0 when they already were).",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model",),
        )
        self.adapter_prefetches = Counter(
            "lorafleet_adapter_prefetches_total",
            "Adapter loads started ahead of need (for a request not yet next).",
            tag_keys=("model",),
        )
        self.adapter_memory_used = Gauge(
            "lorafleet_adapter_memory_used_bytes", "Adapter pages in use, in bytes.", tag_keys=("model",)
        )
        self.adapter_memory_total = Gauge(
            "lorafleet_adapter_memory_total_bytes", "Adapter pages per replica, bytes.", tag_keys=("model",)
        )
        self.adapters_resident = Gauge(
            "lorafleet_adapters_resident",
            "Adapters resident in a replica's memory, by rank.",
            tag_keys=(
                "rank",
                "model",
            ),
        )
        for metric in (
            self.queue_depth,
            self.rows_per_tick,
            self.step_latency,
            self.active_images,
            self.pending_steps,
            self.adapter_requests,
            self.adapter_evictions,
            self.adapter_load_latency,
            self.slots_used,
            self.slots_pinned,
            self.slots_total,
            self.adapter_wait,
            self.adapter_prefetches,
            self.adapter_memory_used,
            self.adapter_memory_total,
            self.adapters_resident,
        ):
            metric.set_default_tags({"model": model})
        self._known_ranks: set[str] = set()
        self._known_tenants: set[str] = set()

    def set_adapter_memory(self, residency) -> None:
        """Slot and memory gauges from an ``AdapterResidency``."""
        resident = residency.resident()
        used, total = residency.memory_bytes()
        self.slots_total.set(residency.capacity)
        self.slots_used.set(len(resident))
        self.slots_pinned.set(len(residency.pinned()))
        self.adapter_memory_used.set(used)
        self.adapter_memory_total.set(total)
        by_rank = {str(rank): n for rank, n in residency.resident_by_rank().items()}
        for rank in self._known_ranks - set(by_rank):
            self.adapters_resident.set(0, tags={"rank": rank})
        for rank, n in by_rank.items():
            self.adapters_resident.set(n, tags={"rank": rank})
        self._known_ranks |= set(by_rank)

    def set_queue_depths(self, depths: dict[str, int]) -> None:
        capped: dict[str, int] = {}
        for tenant, n in depths.items():
            label = self.tenants(tenant)
            capped[label] = capped.get(label, 0) + n
        for tenant in self._known_tenants - set(capped):
            self.queue_depth.set(0, tags={"tenant": tenant})
        for tenant, n in capped.items():
            self.queue_depth.set(n, tags={"tenant": tenant})
        self._known_tenants |= set(capped)
