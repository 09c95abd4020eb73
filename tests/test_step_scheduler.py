"""Step-level batching: admission, buckets, bounds, cancellation — exact state after each tick."""

import asyncio
import itertools

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
    steps.clock = itertools.count().__next__  # each reading later than the one before, at any speed
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
    steps.submit([engine.request("x", steps=10, seed=s, scheduler="ddim") for s in range(2)])
    with pytest.raises(QueueFullError, match="2 of 3 images waiting") as err:
        steps.submit([engine.request("y", steps=1, seed=s) for s in range(2)])
    # Before any tick the estimate assumes 0.5 s per tick: 2 x 10 steps waiting, nothing running.
    assert err.value.retry_after_s == 0.5 * 20
    assert len(steps.waiting) == 2  # nothing of the rejected request was queued


def test_cancelled_jobs_leave_at_next_tick(engine):
    steps = engine.steps
    a, b = steps.submit([engine.request("x", steps=5, seed=s, scheduler="ddim") for s in range(2)])
    steps.tick()
    steps.cancel([a])
    assert steps.tick() == [a]
    assert [j.id for j in steps.active] == [b.id] and (a.index, b.index) == (1, 2)  # a took no other step


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


def test_async_loop_runs_and_cancels(engine, tick_gate):
    """A loop-driven job that is cancelled leaves at the very next tick, without another step."""
    loop_ = DenoiseLoop(engine.steps)
    gate = tick_gate(engine.steps)  # one tick per ``allow``: nothing runs while the test looks

    async def main():
        # Two CFG images fill max_rows_per_tick=4: one batch, x done after 2 ticks, y after 3.
        first = asyncio.create_task(
            loop_.run(
                [
                    engine.request("x", steps=2, seed=1, scheduler="ddim"),
                    engine.request("y", steps=3, seed=2, scheduler="ddim"),
                ]
            )
        )
        await gate.ticks(3)
        jobs = await first
        assert [(j.index, j.done) for j in jobs] == [(2, True), (3, True)] and engine.steps.ticks_run == 3

        task = asyncio.create_task(loop_.run([engine.request("z", steps=50, seed=3, scheduler="ddim")]))
        await gate.ticks(7)
        (job,) = engine.steps.active
        assert (job.index, engine.steps.ticks_run) == (7, 10)  # the loop's next tick waits at the gate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job.cancelled and loop_.cancelled_jobs == 1 and not engine.steps.idle
        await gate.ticks(1)
        # That tick dropped the job and ran no forward; without the cancel it would have stepped it.
        assert engine.steps.idle and job.index == 7 and not job.done
        assert engine.steps.ticks_run == 10 and gate.ran == 11
        return jobs

    jobs = asyncio.run(main())
    assert all(torch.isfinite(j.x_t).all() for j in jobs)
