"""Tenants at the ingress: who a generation is from (``tenant_of``, or a tenant key's name with
``auth.require_keys``), whether it may run now (requests per second, images in flight), and their metrics.

Every generation route calls ``Ingress.tenant`` (``TenantGate.tenant``: 401 for a missing, malformed, unknown
or revoked key when keys are required; 429 over the rate) before it plans, and runs its plan through
``GatedGraph`` (429 over the images-in-flight limit; the images are released when the run ends in any way:
success, error, a client that goes away, a cancelled job). Quotas come from the key's stored record, else
``auth.quotas[name]``, else ``auth.default_quota``; nothing a client sends in a body or a header other than
its key can change them.

Limits are per ingress replica (each replica keeps its own buckets and counters).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from deployments.metrics import safe_label
from lora_registry.config import RegistryConfig
from lora_registry.keys import KeyRecord, KeyStore, key_hash

from .admission import Admission
from .config import AuthConfig, QuotaConfig
from .errors import APIError
from .planning import tenant_of

MAX_TRACKED = 10_000  # key records, token buckets and admitted tenants an ingress replica remembers
ADMIN_TENANT = "admin"  # the admin token used as a generation key (keys required): no quota


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; ``take`` spends one or says how long until one.

    >>> now = [0.0]
    >>> b = TokenBucket(2.0, 1, clock=lambda: now[0])
    >>> b.take(), b.take()
    (None, 0.5)
    >>> now[0] = 0.5; b.take()
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> float | None:
        """None if a token was taken, else the seconds until one will be there."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate_per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass(frozen=True)
class Tenant:
    """Who a request is from, as the ingress decided (never from a request field other than the key)."""

    id: str  # the tenant string on the Plan: "key:alice" (keys required), "key:<hash>", "user:x", "addr:1.2.3.4"
    name: str  # what 429 messages call it: the key's name, else the id
    weight: float | None = None  # the key's fair-share weight; None: denoiser.tenant_weights decides
    quota: QuotaConfig = QuotaConfig()


def unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, None, {"WWW-Authenticate": "Bearer"})


def over_quota(message: str, retry_after_s: float) -> APIError:
    return APIError(429, "rate_limited", message, None, {"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def _quota(config: AuthConfig, name: str, record: KeyRecord | None) -> QuotaConfig:
    """The key's stored overrides over ``auth.quotas[name]`` over ``auth.default_quota``, field by field."""
    fields = config.default_quota.model_dump()
    if name in config.quotas:
        fields.update(config.quotas[name].model_dump(exclude_unset=True))
    if record is not None:
        fields.update(record.quota)
    return QuotaConfig(**fields)


class TenantGate:
    """The one check every generation passes: identity, rate, images in flight (per ingress replica).

    ``keys``: the tenant keys' store (None: no keys can be looked up); ``is_admin``: whether headers carry the
    admin token; ``clock``: monotonic seconds (tests inject one; nothing here sleeps)."""

    def __init__(
        self,
        config: AuthConfig,
        keys: KeyStore | None,
        is_admin: Callable[[object], bool] = lambda headers: False,
        clock: Callable[[], float] = time.monotonic,
        metrics: TenantMetrics | None = None,
    ):
        self.config = config
        self.keys = keys
        self.is_admin = is_admin
        self.clock = clock
        self.metrics = metrics
        self._records: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()  # sha256 -> (record, read at)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # the most recently used MAX_TRACKED
        self.in_flight: dict[str, int] = {}
        self.known: OrderedDict[str, Tenant] = OrderedDict()  # tenant id -> the Tenant last admitted (GatedGraph)
        self._lock = threading.Lock()

    # -- identity ----------------------------------------------------------------------------

    def record(self, raw_key: str) -> KeyRecord | None:
        """The key's record, read from the store at most once per ``auth.key_cache_ttl_s`` (unknown keys too)."""
        sha = key_hash(raw_key)
        now = self.clock()
        cached = self._records.get(sha)
        if cached is not None and now - cached[1] < self.config.key_cache_ttl_s:
            self._records.move_to_end(sha)
            return cached[0]
        record = self.keys.get_hash(sha) if self.keys is not None else None
        self._records[sha] = (record, now)
        self._records.move_to_end(sha)
        while len(self._records) > MAX_TRACKED:
            self._records.popitem(last=False)
        return record

    def identify(self, request: Request, user: str | None) -> Tenant:
        """Who the request is from (401 if keys are required and it has no valid one)."""
        if not self.config.require_keys:
            tenant = tenant_of(request, user)
            return Tenant(tenant, tenant, None, _quota(self.config, tenant, None))
        header = request.headers.get("authorization", "").strip()
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise unauthorized("this endpoint needs Authorization: Bearer <API key>")
        if self.is_admin(request.headers):
            return Tenant("key:" + ADMIN_TENANT, ADMIN_TENANT)
        record = self.record(header[7:].strip())
        if record is None:
            raise unauthorized("unknown API key")
        if record.revoked:
            raise unauthorized(f"API key {record.id!r} was revoked")
        return Tenant("key:" + record.name, record.name, record.weight, _quota(self.config, record.name, record))

    def tenant(self, request: Request, user: str | None = None) -> Tenant:
        """``identify``, then one request of the tenant's rate (429 over it); counted in the tenant metrics."""
        tenant = self.identify(request, user)
        rate = tenant.quota.rate_per_s
        if rate is not None:
            burst = tenant.quota.burst if tenant.quota.burst is not None else max(1, math.ceil(rate))
            with self._lock:
                bucket = self._buckets.get(tenant.id)
                if bucket is None or (bucket.rate_per_s, bucket.burst) != (rate, burst):
                    bucket = self._buckets[tenant.id] = TokenBucket(rate, burst, self.clock)
                self._buckets.move_to_end(tenant.id)
                while len(self._buckets) > MAX_TRACKED:  # an evicted tenant starts again with a full bucket
                    self._buckets.popitem(last=False)
                wait_s = bucket.take()
            if wait_s is not None:
                self._count(tenant, "rate_limited")
                raise over_quota(f"rate limit: {rate:g} requests/s for key {tenant.name!r}", wait_s)
        self._count(tenant, "admitted")
        with self._lock:
            self.known[tenant.id] = tenant
            self.known.move_to_end(tenant.id)
            while len(self.known) > MAX_TRACKED:
                self.known.popitem(last=False)
        return tenant

    def admitted(self, tenant_id: str) -> Tenant:
        """The ``Tenant`` a route admitted under ``tenant_id`` (a plan's ``tenant``)."""
        return self.known.get(tenant_id) or Tenant(tenant_id, tenant_id, None, _quota(self.config, tenant_id, None))

    # -- images in flight --------------------------------------------------------------------

    def hold(self, tenant: Tenant, images: int) -> None:
        """Count ``images`` in flight for ``tenant``, or 429 if that would pass its limit (nothing counted)."""
        limit = tenant.quota.max_images_in_flight
        with self._lock:
            now = self.in_flight.get(tenant.id, 0)
            if limit is not None and now + images > limit:
                refused = True
            else:
                refused = False
                self.in_flight[tenant.id] = now + images
        if refused:
            self._count(tenant, "in_flight_limited")
            raise over_quota(
                f"images in flight limit: {limit} for key {tenant.name!r} ({now} generating, {images} asked)", 1.0
            )

    def release(self, tenant: Tenant, images: int) -> None:
        with self._lock:
            left = self.in_flight.get(tenant.id, 0) - images
            if left > 0:
                self.in_flight[tenant.id] = left
            else:
                self.in_flight.pop(tenant.id, None)

    def _count(self, tenant: Tenant, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.request(tenant.id, outcome)


class GatedGraph:
    """The ingress's graph (``GraphRouter``) with each run's images held in flight for its plan's tenant, and
    admitted (``graph/admission.py``: 503 over its fair share past capacity, else in fair order) when
    ``admission`` is given and on."""

    def __init__(self, inner, gate: TenantGate, admission: Admission | None = None):
        self.inner = inner
        self.gate = gate
        self.admission = admission

    def check_room(self, plan) -> None:
        """429 now if the plan's images would pass its tenant's limit, 503 if admission would refuse it (for a
        stream, whose 200 comes first)."""
        tenant = self.gate.admitted(plan.tenant)
        self.gate.hold(tenant, plan.num_images)
        self.gate.release(tenant, plan.num_images)
        if self.admission is not None:
            self.admission.check(plan.model, tenant.id, plan.num_images, tenant.weight)

    async def run(self, plan, **kwargs):
        tenant = self.gate.admitted(plan.tenant)
        self.gate.hold(tenant, plan.num_images)
        ticket = None
        completed = False
        try:
            if self.admission is not None:
                ticket = await self.admission.admit(plan.model, tenant.id, plan.num_images, tenant.weight)
            result = await self.inner.run(plan, **kwargs)
            completed = True
        finally:
            self.gate.release(tenant, plan.num_images)
            if self.admission is not None:
                self.admission.leave(ticket, completed)
        if self.gate.metrics is not None:
            self.gate.metrics.images(tenant.id, plan.num_images)
            self.gate.metrics.stage_waits(tenant.id, result)
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


_waiting: set[asyncio.Task] = set()  # release_when_done's tasks (a task nobody references may be collected)


def release_when_done(jobs, job_id: str, release: Callable[[], None] | Callable[[bool], None], done=False) -> None:
    """Call ``release`` once job ``job_id`` ends (done, failed, cancelled, expired, or its stream breaks):
    a background task follows the job's event stream to its end. With ``done``, ``release(made)`` is told
    whether the job's last event was ``done`` (its images were made)."""
    from . import job_routes

    async def follow() -> None:
        last = None
        try:
            async for event in job_routes.events(jobs, job_id, False):
                last = getattr(event, "event", None)
        except Exception:
            pass  # the stream broke (the Jobs replica went away): the job is over for us
        finally:
            if done:
                release(last == "done")
            else:
                release()

    task = asyncio.get_running_loop().create_task(follow())
    _waiting.add(task)
    task.add_done_callback(_waiting.discard)


async def held_job(gate: TenantGate, jobs, plan, create: Callable[[], Awaitable], admission: Admission | None = None):
    """``create()`` a job (``job_routes.create``: its 202) with the plan's images held in flight for its tenant
    until the job ends, however it ends: against its images-in-flight limit (429), and in ``admission`` (503
    over its fair share past capacity; a job within it is admitted at once: it waits in the stages' fair
    queues, not at the ingress). A tenant without a limit, with admission off, holds nothing (and no Jobs call
    follows its job)."""
    tenant = gate.admitted(plan.tenant)
    limited = tenant.quota.max_images_in_flight is not None
    admitting = admission is not None and admission.config.enabled
    if not limited and not admitting:
        return await create()
    if limited:
        gate.hold(tenant, plan.num_images)
    ticket = None
    try:
        if admitting:
            ticket = admission.hold(plan.model, tenant.id, plan.num_images, tenant.weight)
        created = await create()
    except BaseException:
        if limited:
            gate.release(tenant, plan.num_images)
        if ticket is not None:
            admission.leave(ticket, completed=False)
        raise

    def release(made: bool) -> None:
        if limited:
            gate.release(tenant, plan.num_images)
        if ticket is not None:
            admission.leave(ticket, completed=made)  # only a done job's images count in the throughput

    release_when_done(jobs, json.loads(created.body)["id"], release, done=True)
    return created


def key_store(registry: RegistryConfig) -> KeyStore:
    """The tenant keys in the registry's store (the adapters' store: local directory or S3)."""
    from lora_registry.stores import open_store

    return KeyStore(open_store(registry.uri, **registry.s3_options()))


class KeyCreate(BaseModel):
    """``POST /v1/admin/keys``: a new tenant key."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        ..., description="The tenant's name: 1-64 letters, digits, '.', '_', '-'; unique among live keys."
    )
    weight: float = Field(1.0, gt=0, le=1000, description="Fair-share weight against other tenants.")
    quota: QuotaConfig = Field(
        default_factory=QuotaConfig, description="Overrides of auth.quotas / auth.default_quota for this key."
    )


class KeyUpdate(BaseModel):
    """``PATCH /v1/admin/keys/{name}``: change a key's weight or quota overrides (null: back to the default)."""

    model_config = ConfigDict(extra="forbid")
    weight: float | None = Field(None, gt=0, le=1000, description="Fair-share weight; unset: unchanged.")
    quota: dict[str, float | None] = Field(
        default_factory=dict, description="rate_per_s, burst, max_images_in_flight; null resets one to the default."
    )


class TenantMetrics:
    """``lorafleet_tenant_requests_total`` (by outcome: admitted, rate_limited, in_flight_limited, overloaded),
    ``lorafleet_tenant_images_total`` and ``lorafleet_tenant_queue_wait_ms`` (by stage: admission, encode,
    denoise, decode), by tenant: the key's name (keys required) or the hashed identity, never a raw key. At most
    ``max_labels`` distinct tenants; later ones are counted as ``other``. Admission's gauges, by model:
    ``lorafleet_admission_capacity_images``, ``lorafleet_admission_images_in_flight``,
    ``lorafleet_admission_images_waiting``."""

    def __init__(self, max_labels: int, registry=None):
        from ray.util.metrics import Counter, Gauge, Histogram

        from deployments.metrics import LATENCY_MS_BUCKETS

        self.max_labels = max_labels
        self.labels: set[str] = set()
        self._requests = Counter(
            "lorafleet_tenant_requests_total",
            "Generation requests by tenant and outcome (admitted, rate_limited, in_flight_limited: the 429s).",
            tag_keys=("tenant", "outcome"),
        )
        self._images = Counter("lorafleet_tenant_images_total", "Images generated by tenant.", tag_keys=("tenant",))
        self._queue_wait = Histogram(
            "lorafleet_tenant_queue_wait_ms",
            "Time a tenant's requests waited in each stage's queue (admission, encode, denoise, decode), in ms.",
            boundaries=[1, *LATENCY_MS_BUCKETS],
            tag_keys=("tenant", "stage"),
        )
        self._capacity = Gauge(
            "lorafleet_admission_capacity_images",
            "Images this ingress replica lets into a model's graph at once (measured or fixed).",
            tag_keys=("model",),
        )
        self._in_flight = Gauge(
            "lorafleet_admission_images_in_flight", "Images admitted and not yet done, by model.", tag_keys=("model",)
        )
        self._waiting = Gauge(
            "lorafleet_admission_images_waiting", "Images waiting in the ingress's fair queue.", tag_keys=("model",)
        )

    def label(self, tenant: str) -> str:
        tenant = safe_label(tenant)  # Ray's tags are ASCII; a user field is anything
        if tenant in self.labels:
            return tenant
        if len(self.labels) < self.max_labels:
            self.labels.add(tenant)
            return tenant
        return "other"

    def request(self, tenant: str, outcome: str) -> None:
        self._requests.inc(tags={"tenant": self.label(tenant), "outcome": outcome})

    def images(self, tenant: str, n: int) -> None:
        self._images.inc(n, tags={"tenant": self.label(tenant)})

    def queue_wait(self, tenant: str, stage: str, ms: float) -> None:
        self._queue_wait.observe(ms, tags={"tenant": self.label(tenant), "stage": stage})

    def stage_waits(self, tenant: str, result) -> None:
        """The stages' waits a run's answer (``DecodedImages``) reports: encode, denoise, decode."""
        for stage, name in (("encode", "encode_wait_ms"), ("denoise", "queue_ms"), ("decode", "decode_wait_ms")):
            ms = getattr(result, name, None)
            if isinstance(ms, (int, float)):
                self.queue_wait(tenant, stage, float(ms))

    def admission(self, model: str, capacity: int, in_flight: int, waiting: int) -> None:
        tags = {"model": model or "-"}
        self._capacity.set(capacity, tags=tags)
        self._in_flight.set(in_flight, tags=tags)
        self._waiting.set(waiting, tags=tags)
