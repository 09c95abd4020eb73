"""Async jobs without Ray: the bounded store (bound, expiry, eviction order), the job manager's
lifecycle and event stream against a fake graph, and the denoiser's progress (position, ETA, step)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.engine.loop import DenoiseLoop
from deployments.messages import DecodedImages, Preview, Queued, Step
from graph.errors import APIError
from graph.job_store import KEEP_ALIVE, Job, JobEvent, JobManager, JobRecords, JobStore, StoreFullError
from graph.planning import Plan

from conftest import make_plan, until
from engine_helpers import Engine


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def job(job_id: str, now: float = 1000.0, steps: int = 10) -> Job:
    return Job(id=job_id, seed=1, steps=steps, loras=[], created=now, updated=now)


# -- the store -------------------------------------------------------------------------


def test_store_is_bounded_by_unfinished_jobs_with_a_retry_hint():
    store = JobStore(max_jobs=2, ttl_s=60, clock=Clock())
    a, b = job("a"), job("b")
    store.add(a)
    store.add(b)
    b.eta_s = 7.4
    with pytest.raises(StoreFullError, match="2 unfinished jobs") as err:
        store.add(job("c"))
    assert err.value.retry_after_s == 7.4  # the soonest known end
    a.eta_s = 0.2
    with pytest.raises(StoreFullError) as err:
        store.add(job("c"))
    assert err.value.retry_after_s == 1.0  # never below a second
    assert len(store) == 2 and store.unfinished == 2 and "c" not in store
    with pytest.raises(ValueError, match="already in the store"):
        store.add(job("a"))


def test_finished_jobs_are_evicted_in_finishing_order_when_full():
    clock = Clock()
    store = JobStore(max_jobs=3, ttl_s=600, clock=clock)
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        store.add(j)
    store.finish(b, "done", images=[])
    clock.now += 1
    store.finish(a, "failed", error={"code": "x", "message": "y", "field": None})
    store.add(job("d"))  # evicts b: finished first (created after a, but the first to expire)
    assert ("a" in store, "b" in store, "c" in store, "d" in store) == (True, False, True, True)
    store.add(job("e"))  # then a
    assert "a" not in store and store.evicted == 2
    with pytest.raises(StoreFullError):  # c, d, e all unfinished
        store.add(job("f"))


def test_finished_jobs_expire_after_the_ttl_and_unfinished_never_do():
    clock = Clock(1000.0)
    store = JobStore(max_jobs=10, ttl_s=60, clock=clock)
    a, b, running = job("a"), job("b"), job("running")
    for j in (a, b, running):
        store.add(j)
    store.finish(a, "done", images=[])
    clock.now = 1030.0
    store.finish(b, "cancelled")
    clock.now = 1059.9
    assert store.get("a") is a and store.get("b") is b
    clock.now = 1060.0  # a's TTL is over
    assert store.get("a") is None and store.get("b") is b and store.expired == 1
    clock.now = 1090.0
    assert store.get("b") is None
    clock.now = 10**6
    assert store.get("running") is running and len(store) == 1 and store.expired == 2


def test_finish_sets_the_final_fields_once():
    clock = Clock()
    store = JobStore(max_jobs=4, ttl_s=60, clock=clock)
    j = job("a", steps=8)
    store.add(j)
    j.status, j.position, j.eta_s, j.step = "running", None, 3.0, 4
    assert j.to_dict()["progress"] == 0.5 and "images" not in j.to_dict() and "error" not in j.to_dict()
    clock.now += 5
    store.finish(j, "failed", error={"code": "overloaded", "message": "full", "field": None})
    d = j.to_dict()
    assert (d["status"], d["error"]["code"], d["eta_s"], d["updated"]) == ("failed", "overloaded", None, 1005.0)
    assert "images" not in d
    with pytest.raises(ValueError, match="already finished as failed"):
        store.finish(j, "cancelled")
    with pytest.raises(ValueError, match="finishes as one of"):
        store.finish(job("b"), "running")
    assert store.remove("a") is j and store.get("a") is None and store.remove("a") is None


def test_keep_alive_is_a_comment_only():
    assert KEEP_ALIVE == JobEvent(comment="keep-alive")
    assert (KEEP_ALIVE.event, KEEP_ALIVE.data, KEEP_ALIVE.id) == (None, None, None)


# -- the manager, against a fake graph ----------------------------------------------------


# -- durable records: jobs outlive the Jobs replica -------------------------------------


def records(root) -> JobRecords:
    from lora_registry.stores import LocalStore

    return JobRecords(LocalStore(root), prefix="jobs/app/")


def test_finished_jobs_outlive_the_replica_and_running_ones_read_interrupted(tmp_path):
    clock = Clock()
    first = JobStore(max_jobs=10, ttl_s=60, clock=clock, records=records(tmp_path))
    done, running, old = job("done"), job("running"), job("old")
    for j in (old, done, running):
        first.add(j).result()  # the creation record is durable before the job is answered for
    first.finish(old, "done", images=[])
    clock.now += 30
    first.finish(done, "done", images=[{"b64": "cG5n", "seed": 1, "width": 64, "height": 64}], step=10)
    first.records.flush()

    clock.now += 31  # "old" has outlived its 60 s TTL; "done" has not
    second = JobStore(max_jobs=10, ttl_s=60, clock=clock, records=records(tmp_path))  # a new replica
    assert second.recover() == 2
    assert second.get("old") is None
    again = second.get("done").to_dict()
    assert again == {**done.to_dict(), "updated": again["updated"]}
    assert again["images"] == [{"b64": "cG5n", "seed": 1, "width": 64, "height": 64}]
    interrupted = second.get("running").to_dict()
    assert interrupted["status"] == "failed" and interrupted["error"]["code"] == "interrupted"
    second.records.flush()
    keys = sorted(o.key for o in second.records.store.list("jobs/"))
    assert keys == ["jobs/app/done.json", "jobs/app/running.json"]  # the expired record is deleted

    third = JobStore(max_jobs=10, ttl_s=60, clock=clock, records=records(tmp_path))
    assert third.recover() == 2 and third.get("running").to_dict()["error"]["code"] == "interrupted"
    third.remove("done")
    third.records.flush()
    assert [o.key for o in third.records.store.list("jobs/")] == ["jobs/app/running.json"]


def test_recovery_keeps_the_newest_jobs_within_the_bound(tmp_path):
    clock = Clock()
    first = JobStore(max_jobs=5, ttl_s=600, clock=clock, records=records(tmp_path))
    for k in range(5):
        j = job(f"j{k}")
        first.add(j)
        clock.now += 1
        first.finish(j, "done", images=[])
    first.records.flush()
    second = JobStore(max_jobs=3, ttl_s=600, clock=clock, records=records(tmp_path))
    assert second.recover() == 3
    assert [k for k in ("j0", "j1", "j2", "j3", "j4") if second.get(k) is not None] == ["j2", "j3", "j4"]


def test_a_manager_job_carries_the_write_of_its_record(tmp_path):
    async def main():
        manager = JobManager(JobStore(10, 60, records=records(tmp_path)), FakeGraph().run)
        j = manager.submit(plan())
        await asyncio.wrap_future(j.saved)
        stored = json.loads((tmp_path / "jobs" / "app" / f"{j.id}.json").read_bytes())
        assert stored["status"] == "queued" and stored["seed"] == 40 and stored["loras"] == j.loras
        manager.cancel(j.id)

    asyncio.run(main())


def plan(**kw) -> Plan:
    return make_plan(**{"seed": 40, "applied": (("ink@2", 0.5),), **kw})


class FakeGraph:
    """``run(plan, on_event)`` that waits for the test to push events and to finish it."""

    def __init__(self):
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = 0

    async def run(self, plan, on_event):
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DecodedImages):
                    return item
                on_event(item)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def finished(*images: bytes) -> DecodedImages:
    return DecodedImages(images=images, encode_ms=1.0, queue_ms=0.0, denoise_ms=2.0, decode_ms=1.0)


def parse(chunks: list[JobEvent]) -> list[tuple[str, dict | None]]:
    return [("keep-alive", None) if chunk == KEEP_ALIVE else (chunk.event, chunk.data) for chunk in chunks]


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_job_lifecycle_and_its_event_stream():
    async def main():
        graph = FakeGraph()
        clock = Clock()
        manager = JobManager(JobStore(10, 60, clock=clock), graph.run, heartbeat_s=0.05)
        j = manager.submit(plan())
        assert j.to_dict() | {"id": "-"} == {
            "id": "-",
            "status": "queued",
            "phase": None,
            "model": "",
            "position": None,
            "eta_s": None,
            "step": 0,
            "steps": 4,
            "progress": 0.0,
            "created": 1000.0,
            "updated": 1000.0,
            "loras": [{"ref": "ink@2", "scale": 0.5}],
            "seed": 40,
        }
        chunks: list[JobEvent] = []

        async def listen():
            async for chunk in manager.events(j.id, previews=True):
                chunks.append(chunk)

        listener = asyncio.create_task(listen())
        await settle()
        for event in (
            Queued(position=3, eta_s=9.0),
            Queued(position=1, eta_s=4.0),
            Step(step=1, steps=4, eta_s=3.0),
            Step(step=2, steps=4, eta_s=2.0),
            Preview(step=2, steps=4, image="data:image/png;base64,AAAA"),
            Step(step=3, steps=4, eta_s=1.0),
        ):
            clock.now += 1
            await graph.events.put(event)
            await settle()
        await until(lambda: KEEP_ALIVE in chunks)  # idle for heartbeat_s: a keep-alive comment
        assert manager.get(j.id).to_dict()["status"] == "running"
        assert manager.get(j.id).to_dict()["progress"] == 0.75
        await graph.events.put(finished(b"png-0", b"png-1"))
        await asyncio.wait_for(listener, 5)
        events = parse(chunks)
        statuses = [(d["status"], d["position"], d["step"]) for name, d in events if name == "status"]
        assert statuses == [
            ("queued", None, 0),
            ("queued", 3, 0),
            ("queued", 1, 0),
            ("running", None, 1),
            ("running", None, 2),
            ("running", None, 3),
        ]
        assert all("images" not in d for name, d in events if name == "status")
        assert [d for name, d in events if name == "preview"] == [
            {"step": 2, "steps": 4, "image": "data:image/png;base64,AAAA"}
        ]
        assert ("keep-alive", None) in events
        name, final = events[-1]
        assert name == "done" and final["status"] == "done" and final["progress"] == 1.0 and final["step"] == 4
        assert final["images"] == [
            {"b64": "cG5nLTA=", "seed": 40, "width": 64, "height": 64},
            {"b64": "cG5nLTE=", "seed": 41, "width": 64, "height": 64},
        ]
        # A client arriving after the end gets the final event at once, then the end of the stream.
        late = [chunk async for chunk in manager.events(j.id)]
        assert parse(late) == [("done", final)]
        assert [chunk async for chunk in manager.events("nope")] == []

    asyncio.run(main())


def test_failed_jobs_carry_the_sync_routes_error_and_unexpected_ones_an_internal_error():
    async def main():
        graph = FakeGraph()
        outcomes: list[str] = []
        manager = JobManager(JobStore(10, 60), graph.run, on_finish=outcomes.append)
        a = manager.submit(plan())
        await settle()
        await graph.events.put(APIError(503, "overloaded", "denoiser queue is full", None, {"Retry-After": "3"}))
        await settle()
        assert a.to_dict()["error"] == {"code": "overloaded", "message": "denoiser queue is full", "field": None}
        b = manager.submit(plan())
        await settle()
        await graph.events.put(RuntimeError("CUDA error: device-side assert\nmore"))
        await settle()
        assert b.status == "failed"
        # The exception's own text goes to the log only: it may hold paths, addresses, tracebacks.
        assert b.error == {
            "code": "internal_error",
            "message": f"internal error (job {b.id}); the server log has the details",
            "field": None,
        }
        assert outcomes == ["failed", "failed"]

    asyncio.run(main())


def test_cancel_stops_the_graph_call_and_deleting_a_finished_job_removes_it():
    async def main():
        graph = FakeGraph()
        outcomes: list[str] = []
        manager = JobManager(JobStore(10, 60), graph.run, on_finish=outcomes.append)
        j = manager.submit(plan())
        await settle()
        await graph.events.put(Step(step=1, steps=4, eta_s=3.0))
        await settle()
        listener = asyncio.create_task(_collect(manager.events(j.id)))
        await settle()
        assert manager.cancel(j.id) is j and j.status == "cancelled"
        await settle()
        assert graph.cancelled == 1 and j.task.cancelled()
        events = parse(await asyncio.wait_for(listener, 5))
        assert [name for name, _ in events] == ["status", "cancelled"]
        await graph.events.put(Step(step=2, steps=4, eta_s=1.0))  # nobody listens any more
        assert manager.get(j.id) is j  # kept (cancelled) until its TTL ...
        assert manager.cancel(j.id) is j and manager.get(j.id) is None  # ... or a second DELETE
        assert manager.cancel(j.id) is None
        assert outcomes == ["cancelled"]

    asyncio.run(main())


async def _collect(stream) -> list[JobEvent]:
    return [chunk async for chunk in stream]


def test_unknown_progress_events_fail_loudly():
    manager = JobManager(JobStore(10, 60), FakeGraph().run)
    j = job("a")
    with pytest.raises(TypeError, match="unknown progress event 'tick'"):
        manager._on_event(j, "tick")


# -- the denoiser's progress: position, step, ETA -----------------------------------------


@pytest.fixture()
def engine(tiny):
    return Engine(tiny, max_rows_per_tick=4, max_queued=8)


def test_position_step_and_eta_arithmetic(engine):
    steps = engine.steps
    assert steps.progress(steps.submit([engine.request("x", steps=4, scheduler="ddim")])) == {
        "position": 0,
        "step": 0,
        "steps": 4,
        "eta_s": None,  # nothing measured yet
    }
    steps.cancel(list(steps.waiting))
    a, b, c = steps.submit([engine.request("x", steps=4, seed=s, scheduler="ddim") for s in range(3)])
    (d,) = steps.submit([engine.request("y", steps=2, seed=9, scheduler="ddim")])
    steps.tick()  # a and b (2 rows each) fill max_rows_per_tick=4; c, d wait
    assert (a.index, b.index, c.index) == (1, 1, 0)
    steps.tick_seconds = 2.0 * steps.ticks_run  # a measured 2 s per tick
    # d: c goes first (position 1); work ahead = a, b: 2 rows x 3 steps left each, c: 2 rows x 4 steps = 20
    # eta = 2 s x (20 / 4 rows per tick + 2 own steps) = 14 s
    assert steps.progress([d]) == {"position": 1, "step": 0, "steps": 2, "eta_s": 14.0}
    assert steps.progress([c]) == {"position": 0, "step": 0, "steps": 4, "eta_s": 2.0 * (12 / 4 + 4)}
    assert steps.progress([a]) == {"position": None, "step": 1, "steps": 4, "eta_s": 6.0}
    # A request of several images: the slowest one's step; queued only while none has started.
    assert steps.progress([a, c])["position"] is None and steps.progress([a, c])["step"] == 0
    steps.tick()
    steps.tick()
    assert steps.progress([a])["step"] == 3 and steps.progress([c])["position"] == 0


def test_eta_counts_turns_of_the_shape_buckets_and_steps_are_the_requests_own(engine):
    steps = engine.steps
    (small,) = steps.submit([engine.request("x", steps=6, size=64)])  # PNDM: 7 timesteps for 6 steps
    (large,) = steps.submit([engine.request("x", steps=6, size=128, guidance_scale=1.0)])
    assert len(small.timesteps) == 7
    steps.tick()  # one bucket per tick: the two take turns
    steps.tick()
    steps.tick_seconds = 0.5 * steps.ticks_run
    assert (small.index, large.index) == (1, 1)
    assert steps.progress([small]) == {"position": None, "step": 0, "steps": 6, "eta_s": 0.5 * 2 * 6}  # 1 * 6 // 7
    while not small.done:
        steps.tick()
    assert steps.progress([small])["step"] == 6 and steps.progress([small])["eta_s"] == 0.0


def test_loop_stream_reports_each_tick_and_cancels_when_left(engine, tick_gate):
    loop_ = DenoiseLoop(engine.steps)
    gate = tick_gate(engine.steps)  # one tick per look: what the stream shows cannot outrun the test

    async def main():
        seen = []
        async for jobs, finished in loop_.stream([engine.request("x", steps=3, seed=1, scheduler="ddim")] * 2):
            seen.append((engine.steps.progress(jobs)["step"], finished))
            if not finished:
                gate.allow()
        assert seen == [(0, False), (1, False), (2, False), (3, True)]
        assert loop_.cancelled_jobs == 0

        ticks = engine.steps.ticks_run
        stream = loop_.stream([engine.request("long", steps=40, seed=2, scheduler="ddim")])
        async for jobs, _ in stream:
            if engine.steps.progress(jobs)["step"] >= 2:
                break  # the client went away
            gate.allow()
        await stream.aclose()
        assert loop_.cancelled_jobs == 1 and jobs[0].cancelled
        assert not engine.steps.idle  # it leaves the batch at the next tick ...
        await gate.ticks(1)
        await until(lambda: engine.steps.idle)
        assert engine.steps.ticks_run - ticks == 2 and jobs[0].index == 2  # ... without another step

        # Cancelling the consumer (DELETE of a job, a closed connection) cancels the images too.
        async def consume():
            async for jobs, _ in loop_.stream([engine.request("long", steps=40, seed=3, scheduler="ddim")]):
                running.append(jobs[0])

        running = []
        task = asyncio.create_task(consume())
        start = engine.steps.ticks_run
        await gate.ticks(2)
        await until(lambda: len(running) == 3)  # the stream has shown both ticks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gate.ticks(1)
        await until(lambda: engine.steps.idle)
        assert loop_.cancelled_jobs == 2 and engine.steps.ticks_run - start == 2 and running[0].index == 2

    asyncio.run(main())


def test_loop_stream_tells_a_queued_request_its_position_as_it_moves(engine, tick_gate):
    loop_ = DenoiseLoop(engine.steps)
    gate = tick_gate(engine.steps)

    async def main():
        # Two CFG images fill the batch (4 rows); the next request waits behind two more.
        running = asyncio.create_task(
            loop_.run([engine.request("a", steps=3, seed=s, scheduler="ddim") for s in (1, 2)])
        )
        waiting = asyncio.create_task(
            loop_.run([engine.request("b", steps=3, seed=s, scheduler="ddim") for s in (3, 4)])
        )
        await gate.ticks(1)  # a's pair is in the batch
        positions = []
        async for jobs, finished in loop_.stream([engine.request("c", steps=2, seed=5, scheduler="ddim")]):
            positions.append(engine.steps.progress(jobs)["position"])
            if not finished:
                gate.allow()
        await asyncio.gather(running, waiting)
        # After each tick: 2 ahead while a's pair finishes, next in line while b's pair runs, then running.
        assert positions == [2, 2, 2, 0, 0, 0, None, None]
        assert engine.steps.ticks_run == 8 and gate.ran == 8

    asyncio.run(main())


@pytest.mark.parametrize(
    "jobs, field",
    [({"max_jobs": 0}, "jobs.max_jobs"), ({"ttl_s": 0}, "jobs.ttl_s"), ({"preview_every_steps": -1}, "jobs.preview")],
)
def test_jobs_config_is_checked_at_start(jobs, field):
    from graph.config import AppConfig, ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AppConfig.load({"jobs": jobs})
    defaults = AppConfig.load({}).jobs
    assert (defaults.max_jobs, defaults.ttl_s, defaults.preview_every_steps, defaults.heartbeat_s) == (1000, 600, 5, 15)


class FlakyStore:
    """A LocalStore whose writes and deletes fail while ``down`` (a store outage)."""

    def __init__(self, root):
        from lora_registry.errors import RegistryUnavailableError
        from lora_registry.stores import LocalStore

        self.inner, self.down, self.error = LocalStore(root), False, RegistryUnavailableError
        self.failed = 0

    def put_bytes(self, key, data):
        if self.down:
            self.failed += 1
            raise self.error(f"S3 upload s3://bucket/{key} failed: could not connect to http://10.0.0.7:9000")
        self.inner.put_bytes(key, data)

    def delete(self, key):
        if self.down:
            self.failed += 1
            raise self.error("S3 delete failed")
        self.inner.delete(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def wait_for(condition, timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "still waiting"
        time.sleep(0.005)


def outage_jobs(tmp_path, **retry):
    """A job store on a ``FlakyStore``, fast retries unless told, with job ``j`` created (its record written)."""
    store = FlakyStore(tmp_path)
    records = JobRecords(store, "jobs/app/", **({"retry_base_s": 0.01, "retry_max_s": 0.05} | retry))
    jobs = JobStore(10, 60, records=records)
    j = job("j")
    jobs.add(j).result()
    return store, records, jobs, j


def test_a_job_whose_record_cannot_be_written_is_refused_and_never_runs(tmp_path):
    store = FlakyStore(tmp_path)
    graph = FakeGraph()
    runs = []
    manager = JobManager(JobStore(10, 60, records=JobRecords(store, "jobs/app/")), graph.run)
    manager.run = lambda plan, on_event: runs.append(plan) or graph.run(plan, on_event)
    store.down = True

    async def main():
        with pytest.raises(store.error):
            await manager.submit_durable(plan())
        await asyncio.sleep(0)  # a task started by mistake would have run by now

    asyncio.run(main())
    assert runs == [] and len(manager.store) == 0


def test_a_job_that_ends_during_a_store_outage_is_written_once_the_store_is_back(tmp_path):
    store, records, jobs, j = outage_jobs(tmp_path)
    store.down = True
    jobs.finish(j, "done", images=[{"b64": "cG5n", "seed": 1, "width": 64, "height": 64}])
    wait_for(lambda: store.failed >= 3)  # tried, and tried again
    path = tmp_path / "jobs" / "app" / "j.json"
    assert json.loads(path.read_bytes())["status"] == "queued" and records.pending == 1
    store.down = False
    wait_for(lambda: records.pending == 0)
    assert json.loads(path.read_bytes())["status"] == "done" and records.retries >= 3
    recovered = JobStore(10, 60, records=JobRecords(store, "jobs/app/"))
    assert recovered.recover() == 1 and recovered.get("j").to_dict()["status"] == "done"


def test_a_newer_write_supersedes_a_retry(tmp_path):
    store, records, jobs, j = outage_jobs(tmp_path)
    store.down = True
    jobs.finish(j, "done", images=[])
    wait_for(lambda: store.failed >= 1)
    jobs.remove("j")  # deleted while its end waits for the store: the delete wins
    store.down = False
    wait_for(lambda: records.pending == 0)
    assert not (tmp_path / "jobs" / "app" / "j.json").exists()


def test_a_write_that_lands_brings_the_waiting_retries_with_it(tmp_path):
    store, records, jobs, j = outage_jobs(tmp_path, retry_base_s=3600, retry_max_s=3600)  # timers never fire
    store.down = True
    jobs.finish(j, "done", images=[])
    wait_for(lambda: store.failed == 1 and records.retries == 1)
    store.down = False
    jobs.add(job("k")).result()  # the store is back: the next write succeeds and kicks the waiting one
    wait_for(lambda: records.pending == 0)
    assert json.loads((tmp_path / "jobs" / "app" / "j.json").read_bytes())["status"] == "done"
