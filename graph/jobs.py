"""The ``Jobs`` deployment: one replica holds every async job, so any ingress replica sees each one.

``POST /v1/jobs`` starts a generation and answers at once; poll it, stream it, cancel it. Each job
is an asyncio task in this replica (``job_store.JobManager``) running TextEncoder -> Denoiser
(stream) -> VAE. The store lives in this replica's memory: if the replica dies, its jobs are gone
(their ids answer 404). The ingress side is ``job_routes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ray import serve

from deployments.messages import DecodedImages, Preview, Queued, Step

from .chain import GraphClient, GraphRouter, ModelGraph
from .config import AppConfig
from .job_store import JobManager, JobRecords, JobStore, LoadingModel, StoreFullError, detached
from .planning import Plan
from .webhooks import WebhookSender


class JobsMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self.jobs = Counter(
            "lorafleet_jobs_total", "Async jobs by outcome (done, failed, cancelled).", tag_keys=("outcome",)
        )
        self.in_store = Gauge("lorafleet_jobs_in_store", "Async jobs held in the store, by state.", tag_keys=("state",))


logger = logging.getLogger("ray.serve")


class ColdStarts:
    """Which models scale from zero and have no Denoiser replica running now, and how long bringing one up
    takes: the last start measured here, else ``default_eta_s``.

    ``running(deployment)`` counts a deployment's running replicas (``serve_running_replicas`` in a replica;
    a fake in tests). A job for a cold model shows ``loading_model`` until its first queue or step event."""

    def __init__(
        self,
        denoisers: dict[str, str],
        running: Callable[[str], int],
        default_eta_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.denoisers = denoisers  # model -> its Denoiser deployment's name, for the models that scale from zero
        self.running = running
        self.default_eta_s = default_eta_s
        self.measured: dict[str, float] = {}
        self.clock = clock

    def eta_s(self, model: str) -> float:
        return self.measured.get(model, self.default_eta_s)

    async def loading(self, model: str) -> float | None:
        """The ETA if ``model`` has no replica running, else None (also for models that never scale to zero)."""
        deployment = self.denoisers.get(model)
        if deployment is None:
            return None
        try:
            count = await asyncio.to_thread(self.running, deployment)
        except Exception as e:  # noqa: BLE001 - the job runs either way; only its status is less precise
            logger.warning("could not read the replica count of %s: %s", deployment, e)
            return None
        return self.eta_s(model) if count == 0 else None

    def timed(self, model: str, on_event: Callable) -> Callable:
        """``on_event``, timing the cold start: the job's first queue or step event means a replica is up."""
        since = self.clock()
        waiting = True

        def timing(event) -> None:
            nonlocal waiting
            if waiting and isinstance(event, (Queued, Step)):
                waiting = False
                self.measured[model] = max(0.0, self.clock() - since)
            on_event(event)

        return timing


def serve_running_replicas(deployment: str) -> int:
    """Running replicas of ``deployment`` in this replica's own application (``serve.status()``)."""
    app = serve.get_replica_context().app_name
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@serve.deployment(name="Jobs")
class Jobs:
    """Holds every async job (``JobManager``) and runs each: TextEncoder -> Denoiser (stream) -> VAE."""

    def __init__(self, graphs: list[ModelGraph], config: AppConfig):
        """``graphs``: each served model's deployments, in ``config.served_models()``'s order."""
        from deployments.metrics import IngressMetrics

        cfg = config.jobs
        graph_metrics = IngressMetrics()  # images, stage latencies and replica failures of the jobs' chains
        served = config.served_models()
        # Keyed by the configured name; a single model without one is the only graph, whatever its plans say.
        names = [s.name or "" for s in served]
        self.graphs = dict(zip(names, graphs, strict=True))
        graph = GraphRouter(
            {n: GraphClient.of(g, config.limits, lambda: graph_metrics, n) for n, g in self.graphs.items()}
        )
        self.cold_starts = ColdStarts(
            {
                s.name or "": f"Denoiser{s.suffix}"
                for s in served
                if s.denoiser.autoscaling is not None and s.denoiser.autoscaling.get("min_replicas", 1) == 0
            },
            serve_running_replicas,
            cfg.cold_start_eta_s,
        )

        async def run(plan: Plan, on_event: Callable[[Queued | Step | Preview], None]) -> DecodedImages:
            model = self.key(plan.model)
            eta = await self.cold_starts.loading(model)
            if eta is not None:
                on_event(LoadingModel(plan.model, eta))
                detached(self.wake(model))
                on_event = self.cold_starts.timed(model, on_event)
            return await graph.run(plan, on_event=on_event, preview_every_steps=cfg.preview_every_steps)

        records = None
        if cfg.durable:
            from lora_registry.stores import open_store

            # Beside the adapters, in a prefix of this application's own (apps may share a registry).
            app = serve.get_replica_context().app_name or "default"
            records = JobRecords(open_store(config.registry.uri, **config.registry.s3_options()), f"jobs/{app}/")
        store = JobStore(cfg.max_jobs, cfg.ttl_s, records=records)
        self.recovered = store.recover()
        self.metrics = JobsMetrics()
        secret = cfg.resolved_webhook_secret()
        webhooks = None
        if secret is not None:
            webhooks = WebhookSender(
                secret.encode(),
                max_attempts=cfg.webhook_max_attempts,
                timeout_s=cfg.webhook_timeout_s,
                backoff_s=cfg.webhook_backoff_s,
            )
        self.manager = JobManager(store, run, cfg.heartbeat_s, self._on_finish, webhooks)
        self.sweep_every_s = min(60.0, max(1.0, cfg.ttl_s / 4))
        self._sweeper: asyncio.Task | None = None

    def key(self, model: str) -> str:
        """A plan's model as this replica names its graphs: the name, or "" for a single unnamed model."""
        return model if model in self.graphs or len(self.graphs) != 1 else next(iter(self.graphs))

    async def wake(self, model: str) -> None:
        """Ask every stage of a cold model for a replica at once (a job's chain reaches the VAE only after
        denoising): a call waiting at a handle is what makes Ray Serve scale a deployment up from zero."""
        graph = self.graphs[model]
        calls = [handle.ready.remote() for handle in (graph.text_encoder, graph.denoiser, graph.vae)]
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.warning("waking model %s: %s", model, outcome)

    async def submit(self, plan: Plan, webhook_url: str | None = None) -> dict:
        """Start a job: ``{"job": job object}``, or ``{"rejected": {"message", "retry_after_s"}}`` when full."""
        self._start_background()
        try:  # the job runs, and is answered for, only once its record is durable
            job = await self.manager.submit_durable(plan, webhook_url)
        except StoreFullError as e:
            return {"rejected": {"message": str(e), "retry_after_s": e.retry_after_s}}
        self._update_gauges()
        return {"job": job.to_dict()}

    def _start_background(self) -> None:
        """On the first call (the constructor has no event loop): the sweeper, and the webhooks of
        jobs that a previous replica left unfinished."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = detached(self._sweep_forever())
        store = self.manager.store
        while store.interrupted:
            self.manager.notify(store.interrupted.pop())

    async def get(self, job_id: str, images: bool = True) -> dict | None:
        self._start_background()
        job = self.manager.get(job_id)
        return None if job is None else job.to_dict(images=images)

    async def cancel(self, job_id: str) -> dict | None:
        job = self.manager.cancel(job_id)
        self._update_gauges()
        return None if job is None else job.to_dict()

    async def events(self, job_id: str, previews: bool = False, last_event_id: str | None = None):
        """One job's Server-Sent Events as ``JobEvent``s (call with ``handle.options(stream=True)``)."""
        async for event in self.manager.events(job_id, previews, last_event_id):
            yield event

    async def keep(self, plan: Plan, images: tuple[bytes, ...], ttl_s: float) -> dict:
        """Hold images made by the ingress for ``ttl_s`` (the OpenAI API's image URLs): ``{"job": {"id"}}``,
        or ``{"rejected": {"message", "retry_after_s"}}`` when the store is full."""
        self._start_background()
        try:
            job = await self.manager.keep(plan, images, ttl_s)
        except StoreFullError as e:
            return {"rejected": {"message": str(e), "retry_after_s": e.retry_after_s}}
        self._update_gauges()
        return {"job": {"id": job.id}}

    async def image(self, job_id: str, index: int) -> bytes | None:
        """The file bytes of a done job's image ``index``, None if there is none (unknown or expired job)."""
        return self.manager.image(job_id, index)

    def _on_finish(self, outcome: str) -> None:
        self.metrics.jobs.inc(tags={"outcome": outcome})
        self._update_gauges()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every_s)
            if self.manager.store.sweep():
                self._update_gauges()

    def _update_gauges(self) -> None:
        store = self.manager.store
        self.metrics.in_store.set(store.unfinished, tags={"state": "unfinished"})
        self.metrics.in_store.set(len(store) - store.unfinished, tags={"state": "finished"})

    def stats(self) -> dict:
        store = self.manager.store
        return {
            "jobs": len(store),
            "unfinished": store.unfinished,
            "evicted": store.evicted,
            "expired": store.expired,
            "recovered": self.recovered,
            "webhooks_delivered": self.manager.webhooks.delivered if self.manager.webhooks else 0,
            "webhooks_failed": self.manager.webhooks.failed if self.manager.webhooks else 0,
        }

    def ready(self) -> bool:
        return True
