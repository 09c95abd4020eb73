"""Step-level batching: admission, buckets, bounds, cancellation — exact state after each tick."""

import asyncio

import pytest
import torch

from deployments.engine.loop import DenoiseLoop
from deployments.engine.step_scheduler import QueueFullError

from engine_helpers import Engine


@pytest.fixture()
def engine(tiny):
    return Engine(tiny, max_rows_per_tick=4, max_queued=3)


def test_short_request_admitted_mid_way_finishes_first(engine):
    steps = engine.steps
    (long_job,) = steps.submit([engine.request("a long one", steps=10, seed=1, scheduler="ddim")])
    for _ in range(3):
        assert steps.tick() == []
    assert long_job.index == 3
    (short_job,) = steps.submit([engine.request("a short one", steps=2, seed=2, scheduler="ddim")])
    assert steps.tick() == []  # joins at the next tick: both advance
    assert (long_job.index, short_job.index) == (4, 1)
    assert steps.tick() == [short_job]  # leaves as soon as it is done
    assert long_job.index == 5 and not long_job.done
    assert [j.id for j in steps.active] == [long_job.id]
    finished = []
    while not steps.idle:
        finished += steps.tick()
    assert finished == [long_job]
    assert short_job.finished_at < long_job.finished_at


def test_rows_per_tick_bound_and_fifo_admission(engine):
    steps = engine.steps
    jobs = steps.submit([engine.request("x", steps=2, seed=s, scheduler="ddim") for s in range(3)])
    steps.tick()
    # Two CFG images (2 rows each) fill max_rows_per_tick=4; the third waits, FIFO.
    assert [j.id for j in steps.active] == [jobs[0].id, jobs[1].id]
    assert list(steps.waiting) == [jobs[2]]
    assert steps.rows_run == 4
    steps.tick()
    steps.tick()
    assert [j.id for j in steps.active] == [jobs[2].id]


def test_guidance_at_most_one_uses_a_single_row(engine):
    (job,) = engine.steps.submit([engine.request("x", guidance_scale=1.0, steps=1)])
    assert job.rows == 1 and not job.cfg
    engine.steps.tick()
    assert engine.steps.rows_run == 1


def test_queue_bound_is_all_or_nothing(engine):
    steps = engine.steps
    steps.submit([engine.request("x", steps=1, seed=s) for s in range(2)])
    with pytest.raises(QueueFullError, match="2 of 3 images waiting") as err:
        steps.submit([engine.request("y", steps=1, seed=s) for s in range(2)])
    assert err.value.retry_after_s >= 1
    assert len(steps.waiting) == 2  # nothing of the rejected request was queued


def test_cancelled_jobs_leave_at_next_tick(engine):
    steps = engine.steps
    a, b = steps.submit([engine.request("x", steps=5, seed=s, scheduler="ddim") for s in range(2)])
    steps.tick()
    steps.cancel([a])
    assert steps.tick() == [a]
    assert [j.id for j in steps.active] == [b.id] and b.index == 2


def test_failed_forward_fails_its_jobs_not_the_loop(engine, monkeypatch):
    steps = engine.steps
    (bad,) = steps.submit([engine.request("x", steps=3)])

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(steps, "unet", boom)
    assert steps.tick() == [bad]
    assert isinstance(bad.error, RuntimeError) and steps.idle
    monkeypatch.undo()
    (good,) = steps.submit([engine.request("x", steps=1)])
    assert steps.tick() == [good] and good.error is None


def test_async_loop_runs_and_cancels(engine):
    loop_ = DenoiseLoop(engine.steps)

    async def main():
        jobs = await loop_.run([engine.request("x", steps=2, seed=1), engine.request("y", steps=3, seed=2)])
        assert [j.done for j in jobs] == [True, True]
        task = asyncio.create_task(loop_.run([engine.request("z", steps=50, seed=3)]))
        while engine.steps.ticks_run < 7:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not engine.steps.idle:  # the cancelled job leaves at the next tick
            await asyncio.sleep(0.01)
        return jobs

    jobs = asyncio.run(main())
    assert torch.isfinite(jobs[0].x_t).all()
    assert engine.steps.ticks_run < 7 + 50
