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


def _tenant_request(engine, tenant, seed, steps=6):
    r = engine.request("a lighthouse", steps=steps, seed=seed, scheduler="euler_a")  # stochastic: a generator
    r.tenant = tenant
    return r


@pytest.mark.parametrize("preempt", [True, False])
def test_a_tenant_below_its_share_pauses_a_flooders_newest_image_which_resumes_unchanged(tiny, preempt):
    """Rows 4, two tenants: the flooder's two running images hold every row. A light tenant's image (its share: 2
    rows) pauses the flooder's newest one at the next tick, which goes back first in the flooder's queue and
    resumes where it was; every image equals that image denoised alone (bit for bit: rows are batch-invariant,
    the paused job keeps its latents, scheduler and generator). Without ``preempt`` the light image waits for a
    flooder's image to finish."""
    engine = Engine(tiny, max_rows_per_tick=4, max_queued=8)
    steps = engine.steps
    steps.preempt = preempt
    heavy = steps.submit([_tenant_request(engine, "heavy", s) for s in (1, 2, 3)])
    steps.tick()
    assert [j.id for j in steps.active] == [heavy[0].id, heavy[1].id] and heavy[1].index == 1
    (light,) = steps.submit([_tenant_request(engine, "light", 7)])
    steps.tick()
    if preempt:
        assert [j.id for j in steps.active] == [heavy[0].id, light.id]
        assert (heavy[1].pauses, steps.pauses, heavy[1].index, light.index) == (1, 1, 1, 1)
        assert steps.waiting.in_order() == [heavy[1], heavy[2]]  # first in its tenant's queue again
    else:
        assert [j.id for j in steps.active] == [heavy[0].id, heavy[1].id] and light.index == 0
        assert steps.pauses == 0
    order = []
    while not steps.idle:
        order += [j.id for j in steps.tick()]
    if preempt:  # the light image ran from its arrival: done before the paused one
        assert order.index(light.id) < order.index(heavy[1].id)
    alone = Engine(tiny, max_rows_per_tick=4)
    for job in [*heavy, light]:
        (ref,) = alone.steps.submit([_tenant_request(alone, job.request.tenant, job.request.seed)])
        while not alone.steps.idle:
            alone.steps.tick()
        assert torch.equal(job.x_t, ref.x_t), (job.request.tenant, job.request.seed)


@pytest.mark.parametrize("preempt", [True, False])
def test_a_tenant_below_its_share_steps_every_tick_while_a_flooders_other_size_still_advances(tiny, preempt):
    """Rows 8, a flooder with images in two sizes (two buckets; one tick steps one bucket) and a light tenant's
    64 px image. Buckets take turns, so without ``preempt`` the light image steps every other tick. With it, the
    light tenant's bucket goes first (2 of its share of 4 rows held) except when the flooder's 128 px images have
    waited ``MAX_TICK_SKIPS`` ticks: it steps 3 ticks of every 4, and the 128 px images still advance. Every image
    equals that image denoised alone, bit for bit."""
    engine = Engine(tiny, max_rows_per_tick=8, max_queued=8)
    steps = engine.steps
    steps.preempt = preempt
    steps.clock = itertools.count().__next__  # a tick's forward lasts 1 (two readings), at any speed

    def request(tenant, seed, size, n_steps):
        r = engine.request("a lighthouse", size=size, steps=n_steps, seed=seed, scheduler="euler_a")
        r.tenant = tenant
        return r

    heavy = steps.submit([request("heavy", 1, 64, 20), request("heavy", 2, 128, 20)])
    steps.tick()
    (light,) = steps.submit([request("light", 3, 64, 8)])
    stepped = []  # per tick: did the light image step? did the flooder's 128 px image?
    while not light.done:
        before = (light.index, heavy[1].index)
        steps.tick()
        stepped.append((light.index > before[0], heavy[1].index > before[1]))
    light_ticks = [a for a, _ in stepped]
    if preempt:
        # The 128 px image had waited one tick (the 64 px bucket's) when the light image came: two more, then it
        # goes; from then on it goes every 4th tick.
        assert steps.MAX_TICK_SKIPS == 3
        assert light_ticks == [True, True, False, True, True, True, False, True, True, True]
    else:
        assert light_ticks == [False, True] * 8  # every other tick (the 128 px image had not stepped yet)
    assert all(a != b for a, b in stepped)  # one bucket a tick
    # step_ms: the 8 ticks that stepped it; denoise_ms also spans the other bucket's ticks between them.
    assert light.step_ms == 8000.0
    assert light.denoise_ms == 1000.0 * (2 * len(stepped) - 1) - (2000.0 if not preempt else 0.0)
    while not steps.idle:
        steps.tick()
    alone = Engine(tiny, max_rows_per_tick=8)
    for job in [*heavy, light]:
        (ref,) = alone.steps.submit(
            [request(job.request.tenant, job.request.seed, job.request.width, len(job.timesteps))]
        )
        while not alone.steps.idle:
            alone.steps.tick()
        assert torch.equal(job.x_t, ref.x_t), (job.request.tenant, job.request.seed)


@pytest.mark.parametrize("cap", [4, 0])
def test_protected_tick_rows_caps_a_tick_that_steps_a_light_image_and_the_flooders_images_take_turns(tiny, cap):
    """Rows 8, one size: a flooder's three images (6 rows) and a light tenant's one (2 rows, its share 4). With
    ``protected_tick_rows`` 4 each tick steps the light image and one of the flooder's (4 rows), the flooder's taking
    turns, longest waiting first, none skipped more than ``MAX_TICK_SKIPS`` ticks in a row; once the light image is
    done, ticks are full again. 0: every tick steps all four. Every image equals that image denoised alone."""
    engine = Engine(tiny, max_rows_per_tick=8, max_queued=8)
    steps = engine.steps
    steps.protected_tick_rows = cap
    heavy = steps.submit([_tenant_request(engine, "heavy", s, steps=12) for s in (1, 2, 3)])
    steps.tick()
    (light,) = steps.submit([_tenant_request(engine, "light", 7, steps=6)])
    rows = []
    while not light.done:
        before = [j.index for j in heavy]
        steps.tick()
        rows.append(tuple(j.index - b for j, b in zip(heavy, before, strict=True)))
    if cap:
        # The light image steps every tick; the flooder's images one a tick, each its turn in order.
        assert rows == [(1, 0, 0), (0, 1, 0), (0, 0, 1)] * 2
        assert (steps.rows_run, light.index) == (6 + 6 * 4, 6)
    else:
        assert rows == [(1, 1, 1)] * 6
    steps.tick()
    assert [j.index for j in heavy] == ([4, 4, 4] if cap else [8, 8, 8])  # a full tick again
    while not steps.idle:
        steps.tick()
    alone = Engine(tiny, max_rows_per_tick=8)
    for job in [*heavy, light]:
        r = _tenant_request(alone, job.request.tenant, job.request.seed, steps=len(job.timesteps))
        (ref,) = alone.steps.submit([r])
        while not alone.steps.idle:
            alone.steps.tick()
        assert torch.equal(job.x_t, ref.x_t), (job.request.tenant, job.request.seed)


def test_no_pause_for_a_tenant_at_its_share_or_to_take_a_tenant_below_its_own():
    """The rule's two limits, on the admission arithmetic alone (``_make_room``): a tenant already holding its share
    pauses nobody, and a flooder is never paused below its own share."""
    from types import SimpleNamespace

    from deployments.engine.fair_queue import FairQueue
    from deployments.engine.step_scheduler import StepScheduler

    steps = StepScheduler.__new__(StepScheduler)  # the arithmetic only: no UNet
    steps.preempt, steps.max_rows_per_tick, steps.waiting = True, 4, FairQueue()

    def job(tenant, rows, admitted):
        return SimpleNamespace(request=SimpleNamespace(tenant=tenant), rows=rows, admitted=admitted)

    steps.active = [job("heavy", 2, 0), job("light", 2, 1)]  # each at its share (2 of 4)
    assert steps._make_room(job("light", 2, -1), 4, dry_run=True) is None
    steps.active = [job("heavy", 2, 0), job("heavy", 2, 1)]
    assert steps._make_room(job("light", 2, -1), 4, dry_run=True) == 2  # pauses one of heavy's two
    assert steps._make_room(job("light", 4, -1), 4, dry_run=True) is None  # 4 rows: over light's share
    steps.active = [job("heavy", 4, 0)]  # one 4-row job: pausing it would take heavy below its share
    assert steps._make_room(job("light", 2, -1), 4, dry_run=True) is None
    steps.preempt = False
    steps.active = [job("heavy", 2, 0), job("heavy", 2, 1)]
    assert steps._make_room(job("light", 2, -1), 4, dry_run=True) is None
