"""Drive a ``StepScheduler`` from asyncio: one background task, ticks in a worker thread.

The event loop stays free to accept requests while a UNet forward runs; new
requests are admitted at the next tick. When every waiting request waits for
an adapter load, the loop sleeps until one is done (``wake_threadsafe``, the
residency's ``on_change``) or a request arrives or leaves. ``run`` waits for a request's images;
``stream`` also reports after every tick, for progress (queue position, step).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from .step_scheduler import DenoiseJob, DenoiseRequest, StepScheduler


class DenoiseLoop:
    def __init__(self, steps: StepScheduler):
        self.steps = steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self._futures: dict[int, asyncio.Future] = {}
        self._watchers: set[asyncio.Event] = set()  # one per streaming request: set after each tick
        self._wake: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.cancelled_jobs = 0  # images dropped because their caller went away (or cancelled)
        self.sleeping = False  # every waiting request waits for an adapter load: no tick runs until one is done

    def _submit(self, requests: list[DenoiseRequest]) -> tuple[list[DenoiseJob], list[asyncio.Future]]:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
            self._event_loop = loop
        jobs = self.steps.submit(requests)
        futures = []
        for job in jobs:
            fut = loop.create_future()
            self._futures[job.id] = fut
            futures.append(fut)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drive())
        self._wake.set()
        self._notify()  # a newcomer may queue ahead of others (fair queuing)
        return jobs, futures

    def _cancel(self, jobs: list[DenoiseJob]) -> None:
        """Drop unfinished jobs: waiting ones at once, running ones leave the batch at the next tick."""
        unfinished = [j for j in jobs if not (j.done or j.error is not None or j.cancelled)]
        self.cancelled_jobs += len(unfinished)
        self.steps.cancel(unfinished)
        if self._wake is not None:
            self._wake.set()
        self._notify()

    def _forget(self, jobs: list[DenoiseJob]) -> None:
        for job in jobs:
            self._futures.pop(job.id, None)

    @staticmethod
    def _raise_errors(jobs: list[DenoiseJob]) -> None:
        for job in jobs:
            if job.error is not None:
                raise job.error

    async def run(self, requests: list[DenoiseRequest]) -> list[DenoiseJob]:
        """Denoise ``requests`` (all admitted or ``QueueFullError``); returns their finished jobs.

        If the caller is cancelled (client gone), its jobs leave the batch at the next tick.
        """
        jobs, futures = self._submit(requests)
        try:
            await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self._cancel(jobs)
            raise
        finally:
            self._forget(jobs)
        self._raise_errors(jobs)
        return jobs

    async def stream(self, requests: list[DenoiseRequest]) -> AsyncIterator[tuple[list[DenoiseJob], bool]]:
        """Denoise ``requests``, yielding ``(jobs, finished)`` at once and after every tick.

        Read the jobs' progress at each yield (``StepScheduler.progress``); the last
        yield has ``finished=True`` (or a job's error is raised). Leaving the iteration
        early, or being cancelled, cancels the jobs: they leave the batch at the next tick.

        >>> async for jobs, finished in loop.stream(requests):   # doctest: +SKIP
        ...     print(steps.progress(jobs))
        """
        jobs, futures = self._submit(requests)
        changed = asyncio.Event()
        self._watchers.add(changed)
        finished = False
        try:
            yield jobs, False
            while not all(f.done() for f in futures):
                await changed.wait()
                changed.clear()
                if not all(f.done() for f in futures):
                    yield jobs, False
            finished = True
            self._raise_errors(jobs)
            yield jobs, True
        finally:
            self._watchers.discard(changed)
            if not finished:
                self._cancel(jobs)
            self._forget(jobs)

    def wake_threadsafe(self) -> None:
        """From any thread: something a waiting request waits for changed (an adapter became resident)."""
        if self._event_loop is not None and self._wake is not None:
            self._event_loop.call_soon_threadsafe(self._wake.set)

    def _notify(self) -> None:
        for changed in self._watchers:
            changed.set()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if self.steps.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()  # before the tick: a wake during it is not lost
            finished = await loop.run_in_executor(self._executor, self.steps.tick)
            for job in finished:
                fut = self._futures.get(job.id)
                if fut is not None and not fut.done():
                    fut.set_result(job)
            self._notify()
            if not finished and not self.steps.runnable and not self.steps.idle:
                self.sleeping = True  # every waiting request waits for an adapter load
                try:
                    await self._wake.wait()
                finally:
                    self.sleeping = False
