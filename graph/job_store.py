"""Async jobs without Ray: the job object, the bounded store, and the manager that runs them.

``JobManager.submit(plan)`` stores a ``Job`` and starts it as an asyncio task running the same
chain as ``/v1/generate`` (its ``run``: ``GraphClient.run`` with the Denoiser called as a stream),
so that queue position, step and previews arrive as they change; ``events`` is a job's Server-Sent
Events (``JobEvent``: the ingress frames them with FastAPI's SSE support). The store is bounded
(``max_jobs``: finished jobs are evicted oldest-first, then new jobs get ``StoreFullError``) and
finished jobs expire after ``ttl_s`` (or their own ``Job.ttl_s``). ``JobManager.keep`` stores images
made elsewhere as a finished job: the OpenAI API's image URLs. The ``Jobs`` deployment (``jobs.py``)
holds one of these; ``job_routes.py`` is the ingress side.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import heapq
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from deployments.messages import DecodedImages, Preview, Queued, Step

from .errors import APIError
from .planning import Plan
from .webhooks import WebhookSender

logger = logging.getLogger("ray.serve")

FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of a job's stream (the ingress frames it: ``job_routes.events``).

    ``id`` is ``"<version>.<preview_version>"``: the state the client has seen, so a stream resumed with
    it as ``Last-Event-ID`` sends only what changed since. ``comment`` alone: a keep-alive line."""

    event: str | None = None  # status | preview | done | failed | cancelled
    data: dict | None = None
    id: str | None = None
    comment: str | None = None


KEEP_ALIVE = JobEvent(comment="keep-alive")


@dataclass(eq=False)
class Job:
    """One async job: the public job object's fields, plus what its event streams wait on."""

    id: str
    seed: int
    steps: int
    loras: list[dict]
    created: float
    updated: float
    status: str = "queued"  # queued | running | done | failed | cancelled
    model: str = ""  # the base model it runs on
    phase: str | None = None  # while queued: "loading_model" (its model is scaling up from zero), else None
    position: int | None = None  # images ahead in the denoiser's queue (0 = next), while queued there
    eta_s: float | None = None
    step: int = 0
    images: list[dict] | None = None  # done only
    error: dict | None = None  # failed only: {"code", "message", "field"}, as the sync route answers
    preview: dict | None = None  # the latest {"step", "steps", "image": data URL}
    version: int = 0  # bumped on every change of the job object (one `status` event each)
    preview_version: int = 0
    finished_at: float | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    saved: Future | None = field(default=None, repr=False)  # the write of its creation record
    webhook_url: str | None = None  # POSTed the job object when it ends (graph/webhooks.py)
    ttl_s: float | None = None  # how long it stays once finished; None: the store's ttl_s

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self, images: bool = True) -> dict:
        """The job object of the HTTP API (``images`` only when done and asked for, ``error`` only when failed)."""
        out = {
            "id": self.id,
            "status": self.status,
            "phase": self.phase,
            "model": self.model,
            "position": self.position,
            "eta_s": self.eta_s,
            "step": self.step,
            "steps": self.steps,
            "progress": 1.0 if self.status == "done" else self.step / self.steps,
            "created": self.created,
            "updated": self.updated,
            "loras": self.loras,
            "seed": self.seed,
        }
        if self.status == "done" and images:
            out["images"] = self.images
        if self.status == "failed":
            out["error"] = self.error
        return out

    # What outlives the replica (``JobRecords``): the job object, not its progress or preview.
    _RECORD_FIELDS = ("id", "seed", "steps", "loras", "created", "updated", "status", "step", "images", "error")

    def to_record(self) -> dict:
        record = {name: getattr(self, name) for name in self._RECORD_FIELDS}
        extra = {"finished_at": self.finished_at, "webhook_url": self.webhook_url, "model": self.model}
        return {**record, **extra, "ttl_s": self.ttl_s}

    @classmethod
    def from_record(cls, record: dict) -> Job:
        job = cls(**{name: record[name] for name in (*cls._RECORD_FIELDS, "finished_at")})
        job.webhook_url = record.get("webhook_url")
        job.model = record.get("model", "")  # records written before models had names lack it
        job.ttl_s = record.get("ttl_s")
        job.eta_s = 0.0 if job.status == "done" else None  # as JobStore.finish leaves it
        return job

    def touch(self, now: float, preview: bool = False) -> None:
        """Record a change and wake every stream waiting on this job."""
        self.updated = now
        if preview:
            self.preview_version += 1
        else:
            self.version += 1
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


_DELETE = object()  # a queued delete, in JobRecords._latest


@dataclass(frozen=True)
class LoadingModel:
    """A job's model has no replica yet (it scales from zero): one is starting, expected in ``eta_s``."""

    model: str
    eta_s: float


class JobRecords:
    """Where job records outlive the replica: one JSON object per job under ``prefix`` in a store
    (the adapter registry's: S3 or a local directory, ``lora_registry.stores``).

    Writes go through one background thread, in order, so the event loop never waits on S3;
    ``save`` returns a future for a caller that must know the record is durable (job creation).
    A record is written when a job is created and when it finishes, not on every step: after a
    restart, a job that was queued or running is known, as ``failed`` / ``interrupted``.

    A creation record that cannot be written fails its future (the job is refused, never run).
    Any later write (``retry=True``: a job's end, a delete) that fails is tried again with backoff
    (``retry_base_s`` doubling up to ``retry_max_s``) until it lands or a newer write or delete of
    the same job supersedes it, and at once when any other write succeeds (the store is back), so
    a job that ends during a store outage is durable as soon as the store returns. Until then the
    record lives only in this replica (``pending`` counts what is not yet written): a replica lost
    before the store returns loses it.
    """

    def __init__(self, store, prefix: str = "jobs/", retry_base_s: float = 1.0, retry_max_s: float = 10.0):
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.prefix = prefix
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.retries = 0  # writes tried again after a failure
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-records")
        self._lock = threading.Lock()
        self._latest: dict[str, object] = {}  # key -> the newest write queued for it (bytes, or _DELETE)
        self._waiting: set[str] = set()  # keys whose write failed and waits for a retry

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    @property
    def pending(self) -> int:
        """Writes queued or waiting for a retry."""
        with self._lock:
            return len(self._latest)

    def save(self, record: dict, *, retry: bool = False) -> Future:
        data = json.dumps(record, separators=(",", ":")).encode()
        return self._queue(self._key(record["id"]), data, retry)

    def delete(self, job_id: str) -> Future:
        return self._queue(self._key(job_id), _DELETE, retry=True)  # idempotent: retried like an end

    def _queue(self, key: str, op: object, retry: bool, attempt: int = 0) -> Future:
        with self._lock:
            if attempt == 0:
                self._latest[key] = op
        return self._io.submit(self._write, key, op, retry, attempt)

    def _write(self, key: str, op: object, retry: bool, attempt: int) -> None:
        with self._lock:
            if self._latest.get(key) is not op:
                return  # superseded by a newer write or delete of this job
        try:
            if op is _DELETE:
                self.store.delete(key)
            else:
                self.store.put_bytes(key, op)
        except Exception:
            if not retry:
                with self._lock:
                    if self._latest.get(key) is op:
                        del self._latest[key]
                raise
            delay = min(self.retry_max_s, self.retry_base_s * 2**attempt)
            logger.warning("job record %s not written (try %d); again in %.0f s", key, attempt + 1, delay)
            self.retries += 1
            with self._lock:
                self._waiting.add(key)
            timer = threading.Timer(delay, self._queue, (key, op, retry, attempt + 1))
            timer.daemon = True
            timer.start()
            return
        with self._lock:
            if self._latest.get(key) is op:
                del self._latest[key]
            self._waiting.discard(key)
            waiting, self._waiting = [(k, self._latest.get(k)) for k in self._waiting], set()
        for k, pending in waiting:  # the store took a write: the ones that failed before need not wait
            if pending is not None:
                self._io.submit(self._write, k, pending, True, 1)

    def load_all(self) -> list[dict]:
        """Every stored record (blocking: for start-up); unreadable ones are skipped."""
        records = []
        for obj in self.store.list(self.prefix):
            try:
                records.append(json.loads(self.store.get_bytes(obj.key)))
            except (ValueError, KeyError):
                continue
        return records

    def flush(self) -> None:
        """Wait for every write queued so far."""
        self._io.submit(lambda: None).result()


class StoreFullError(RuntimeError):
    def __init__(self, limit: int, retry_after_s: float):
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"the job store holds {limit} unfinished jobs, its limit; retry in {retry_after_s:.0f}s")


class JobStore:
    """Jobs by id, bounded: at most ``max_jobs``; finished ones expire ``ttl_s`` after finishing.

    When a new job finds the store full, the finished job that finished first is evicted
    (it would have expired first); with none finished, ``StoreFullError``.
    """

    def __init__(
        self, max_jobs: int, ttl_s: float, clock: Callable[[], float] = time.time, records: JobRecords | None = None
    ):
        """``records``: where jobs outlive this process (``recover`` reads them back); None: memory only."""
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.clock = clock
        self.records = records
        self.interrupted: list[Job] = []  # jobs ``recover`` found unfinished (their webhooks are due)
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in finishing order
        self._expiry: list[tuple[float, str]] = []  # heap of (expires at, id) of finished jobs; stale entries skipped
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    @property
    def unfinished(self) -> int:
        return len(self._jobs) - len(self._finished)

    def expires_at(self, job: Job) -> float:
        """When a finished job expires: ``ttl_s`` (its own, else the store's) after it finished."""
        return job.finished_at + (self.ttl_s if job.ttl_s is None else job.ttl_s)

    def _mark_finished(self, job: Job) -> None:
        self._finished[job.id] = job
        heapq.heappush(self._expiry, (self.expires_at(job), job.id))

    def add(self, job: Job) -> Future | None:
        """Store a new job (a finished one too: ``JobManager.keep``); returns the future of its record's
        write (None without ``records``)."""
        self.sweep()
        if job.id in self._jobs:
            raise ValueError(f"job {job.id!r} is already in the store")
        if len(self._jobs) >= self.max_jobs:
            if not self._finished:
                known = [j.eta_s for j in self._jobs.values() if j.eta_s is not None]
                raise StoreFullError(self.max_jobs, max(1.0, min(known, default=5.0)))
            oldest, _ = self._finished.popitem(last=False)
            del self._jobs[oldest]
            self._forget(oldest)
            self.evicted += 1
        self._jobs[job.id] = job
        if job.finished:
            self._mark_finished(job)
        return self._save(job)

    def _save(self, job: Job, retry: bool = False) -> Future | None:
        return None if self.records is None else self.records.save(job.to_record(), retry=retry)

    def _forget(self, job_id: str) -> None:
        if self.records is not None:
            self.records.delete(job_id)

    def recover(self) -> int:
        """Read back the records a previous replica left (at start-up, before any job is added).

        A finished job is kept until its TTL; one that was queued or running when that replica
        stopped is finished now as ``failed`` with code ``interrupted`` (its images were never
        made); expired records are deleted. Returns how many jobs were restored.
        """
        if self.records is None:
            return 0
        now = self.clock()
        restored = []
        for record in self.records.load_all():
            try:
                job = Job.from_record(record)
            except (KeyError, TypeError):
                continue
            if job.finished and now >= self.expires_at(job):
                self._forget(job.id)
                continue
            restored.append(job)
        restored.sort(key=lambda j: j.finished_at or now)  # finishing order: the oldest evicted first
        kept, dropped = restored[-self.max_jobs :], restored[: -self.max_jobs]
        for job in kept:
            self._jobs[job.id] = job
            if job.finished:
                self._mark_finished(job)
            else:
                message = "the server restarted while this job ran; submit it again"
                self.finish(job, "failed", error={"code": "interrupted", "message": message, "field": None})
                self.interrupted.append(job)
        for job in dropped:
            self._forget(job.id)
        return len(kept)

    def get(self, job_id: str) -> Job | None:
        self.sweep()
        return self._jobs.get(job_id)

    def finish(self, job: Job, status: str, **fields) -> None:
        """Move a job to a final status (``images=`` or ``error=`` with it); its TTL starts now."""
        if status not in FINISHED:
            raise ValueError(f"a job finishes as one of {FINISHED}, not {status!r}")
        if job.finished:
            raise ValueError(f"job {job.id} already finished as {job.status}")
        for name, value in fields.items():
            setattr(job, name, value)
        now = self.clock()
        job.status = status
        job.phase = None
        job.position = None
        job.eta_s = None if status != "done" else 0.0
        job.finished_at = now
        if job.id in self._jobs:
            self._mark_finished(job)
            self._save(job, retry=True)  # tried until the store takes it
        job.touch(now)

    def remove(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        self._finished.pop(job_id, None)
        if job is not None:
            self._forget(job_id)
        return job

    def sweep(self) -> int:
        """Drop finished jobs whose TTL has passed (``expires_at``); returns how many."""
        now = self.clock()
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            expires, job_id = heapq.heappop(self._expiry)
            job = self._finished.get(job_id)
            if job is None or self.expires_at(job) != expires:  # removed or evicted since
                continue
            del self._finished[job_id]
            del self._jobs[job_id]
            self._forget(job_id)
            n += 1
        self.expired += n
        return n


def detached(coro) -> asyncio.Task:
    """A task outside the current Serve request's context: the request that starts a job ends
    (or is cancelled) long before the job, and the job's calls must not count as its children."""
    loop = asyncio.get_running_loop()
    return contextvars.Context().run(loop.create_task, coro)


class JobManager:
    """Starts, tracks, cancels and streams jobs (no Ray: ``run`` is the graph call).

    ``run(plan, on_event)`` produces the chain's result (``DecodedImages``) and calls
    ``on_event`` with each progress event of the Denoiser's stream (``Queued``, ``Step``,
    ``Preview``); it raises ``APIError`` as the sync route would.
    ``on_finish(outcome)`` is told each job's end (for metrics). ``webhooks`` delivers the
    job object of a job created with a ``webhook_url`` when it ends.
    """

    def __init__(
        self,
        store: JobStore,
        run: Callable[[Plan, Callable[[Queued | Step | Preview], None]], Awaitable[DecodedImages]],
        heartbeat_s: float = 15.0,
        on_finish: Callable[[str], None] | None = None,
        webhooks: WebhookSender | None = None,
    ):
        self.store = store
        self.run = run
        self.heartbeat_s = heartbeat_s
        self.on_finish = on_finish
        self.webhooks = webhooks
        self.deliveries: set[asyncio.Task] = set()

    def submit(self, plan: Plan, webhook_url: str | None = None) -> Job:
        """Store a job for ``plan`` and start it (``StoreFullError`` when the store is full).

        With durable records, prefer ``create``, wait for ``job.saved``, then ``start``: a job
        whose record cannot be written is refused before it runs.
        """
        job = self.create(plan, webhook_url)
        self.start(job, plan)
        return job

    def create(self, plan: Plan, webhook_url: str | None = None) -> Job:
        """Store a job for ``plan``, not started; ``job.saved`` is its record's write (or None)."""
        if webhook_url is not None and self.webhooks is None:
            raise ValueError("a webhook_url needs a WebhookSender (jobs.webhook_secret)")
        job = self._new_job(plan, self.store.clock(), webhook_url=webhook_url)
        job.saved = self.store.add(job)
        return job

    @staticmethod
    def _new_job(plan: Plan, now: float, **fields) -> Job:
        """A job record for ``plan`` created ``now`` (``fields``: its status, images, ... where not the defaults)."""
        return Job(
            id=secrets.token_urlsafe(16),
            seed=plan.seed,
            steps=plan.steps,
            loras=[{"ref": ref, "scale": scale} for ref, scale in plan.applied],
            model=plan.model,
            created=now,
            updated=now,
            **fields,
        )

    async def submit_durable(self, plan: Plan, webhook_url: str | None = None) -> Job:
        """``submit``, but the job starts only once its creation record is durable; if the record
        cannot be written, the job is dropped and the write's error raised (the client gets no id,
        so nothing may run)."""
        job = self.create(plan, webhook_url)
        if job.saved is not None:
            try:
                await asyncio.wrap_future(job.saved)
            except BaseException:
                self.refuse(job)
                raise
        self.start(job, plan)
        return job

    def start(self, job: Job, plan: Plan) -> None:
        job.task = detached(self._run(job, plan))

    def refuse(self, job: Job) -> None:
        """Drop a created job that will not run (its record could not be written)."""
        self.store.remove(job.id)

    async def _run(self, job: Job, plan: Plan) -> None:
        try:
            result = await self.run(plan, lambda event: self._on_event(job, event))
        except asyncio.CancelledError:
            raise  # cancel() has recorded it
        except APIError as e:
            self._finish(job, "failed", error={"code": e.code, "message": e.message, "field": e.field})
        except Exception as e:  # an unexpected failure still ends the job; the detail goes to the log
            logger.error("job %s failed", job.id, exc_info=e)
            message = f"internal error (job {job.id}); the server log has the details"
            self._finish(job, "failed", error={"code": "internal_error", "message": message, "field": None})
        else:
            self._finish(job, "done", images=_image_dicts(plan, result.images), step=job.steps)

    def _on_event(self, job: Job, event: LoadingModel | Queued | Step | Preview) -> None:
        """A progress event of the Denoiser's stream -> the job object."""
        if job.finished:
            return
        now = self.store.clock()
        if isinstance(event, LoadingModel):
            job.status, job.phase, job.position, job.eta_s = "queued", "loading_model", None, event.eta_s
        elif isinstance(event, Queued):
            job.status, job.phase, job.position, job.eta_s = "queued", None, event.position, event.eta_s
        elif isinstance(event, Step):
            job.status, job.phase, job.position, job.eta_s, job.step = "running", None, None, event.eta_s, event.step
        elif isinstance(event, Preview):
            job.preview = {"step": event.step, "steps": event.steps, "image": event.image}
            job.touch(now, preview=True)
            return
        else:
            raise TypeError(f"unknown progress event {event!r}")
        job.touch(now)

    def _finish(self, job: Job, status: str, **fields) -> None:
        if job.finished:  # cancelled while its last step was completing: the cancellation stands
            return
        self.store.finish(job, status, **fields)
        if self.on_finish is not None:
            self.on_finish(status)
        self.notify(job)

    def notify(self, job: Job) -> None:
        """Deliver the ended job's webhook, if it asked for one (in the background)."""
        if job.webhook_url is None or self.webhooks is None:
            return
        task = detached(self.webhooks.deliver(job.webhook_url, f"job.{job.status}", job.to_dict()))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel an unfinished job (its images leave the denoiser's batch at the next step);
        remove a finished one. Returns the job, None if unknown."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if job.finished:
            self.store.remove(job_id)
            return job
        if job.task is not None:
            job.task.cancel()  # GraphClient cancels its calls in flight: the Denoiser's stream too
        self._finish(job, "cancelled")
        return job

    async def keep(self, plan: Plan, images: tuple[bytes, ...], ttl_s: float) -> Job:
        """Store ``images`` (made for ``plan`` outside any job) as a finished ``done`` job that expires
        ``ttl_s`` after now: what the OpenAI API's image URLs serve (``image``). Returns once its record
        is durable (with ``records``); ``StoreFullError`` when the store is full."""
        now = self.store.clock()
        job = self._new_job(
            plan,
            now,
            status="done",
            step=plan.steps,
            eta_s=0.0,
            images=_image_dicts(plan, images),
            finished_at=now,
            ttl_s=ttl_s,
        )
        saved = self.store.add(job)
        if saved is not None:
            try:
                await asyncio.wrap_future(saved)
            except BaseException:
                self.refuse(job)
                raise
        return job

    def image(self, job_id: str, index: int) -> bytes | None:
        """The file bytes of a done job's image ``index``; None if the job is unknown, expired, not done,
        or has no such image."""
        job = self.store.get(job_id)
        if job is None or job.status != "done" or not 0 <= index < len(job.images or ()):
            return None
        return base64.b64decode(job.images[index]["b64"])

    async def events(
        self, job_id: str, previews: bool = False, last_event_id: str | None = None
    ) -> AsyncIterator[JobEvent]:
        """The job's Server-Sent Events: ``status`` on each change (without images), ``preview`` (if
        asked), then the final ``done``/``failed``/``cancelled`` (with images); ``KEEP_ALIVE`` every
        ``heartbeat_s`` while nothing changes. Nothing for an unknown id.

        Each event's id is the state it shows (``JobEvent``); with ``last_event_id`` (a reconnecting
        client's ``Last-Event-ID``) what that state already showed is not sent again (the final event is)."""
        job = self.store.get(job_id)
        if job is None:
            return
        sent, sent_preview = _seen(last_event_id)
        while True:
            changed = job.changed  # taken before reading, so no change in between is missed
            if job.finished:
                yield JobEvent(job.status, job.to_dict(), f"{job.version}.{job.preview_version}")
                return
            if job.version != sent:
                sent = job.version
                yield JobEvent("status", job.to_dict(images=False), f"{sent}.{sent_preview}")
            if previews and job.preview_version != sent_preview and job.preview is not None:
                sent_preview = job.preview_version
                yield JobEvent("preview", job.preview, f"{sent}.{sent_preview}")
            try:
                await asyncio.wait_for(changed.wait(), timeout=self.heartbeat_s)
            except asyncio.TimeoutError:
                yield KEEP_ALIVE


def _seen(last_event_id: str | None) -> tuple[int, int]:
    """``"7.2"`` -> (7, 2): the job version and preview version a client has seen; (-1, 0) for none or junk."""
    version, _, preview = (last_event_id or "").partition(".")
    if version.isascii() and version.isdigit() and preview.isascii() and preview.isdigit():
        return int(version), int(preview)
    return -1, 0


def _image_dicts(plan: Plan, images: tuple[bytes, ...]) -> list[dict]:
    """A done job's ``images``: each file in base64 with its seed and size."""
    return [
        {"b64": base64.b64encode(data).decode(), "seed": plan.seed + k, "width": plan.width, "height": plan.height}
        for k, data in enumerate(images)
    ]
