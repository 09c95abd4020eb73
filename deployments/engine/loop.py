"""Drive a ``StepScheduler`` from asyncio: one background task, ticks in a worker thread.

The event loop stays free to accept requests while a UNet forward runs; new
requests are admitted at the next tick.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .step_scheduler import DenoiseJob, DenoiseRequest, StepScheduler


class DenoiseLoop:
    def __init__(self, steps: StepScheduler):
        self.steps = steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self._futures: dict[int, asyncio.Future] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def run(self, requests: list[DenoiseRequest]) -> list[DenoiseJob]:
        """Denoise ``requests`` (all admitted or ``QueueFullError``); returns their finished jobs.

        If the caller is cancelled (client gone), its jobs leave the batch at the next tick.
        """
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        jobs = self.steps.submit(requests)
        futures = []
        for job in jobs:
            fut = loop.create_future()
            self._futures[job.id] = fut
            futures.append(fut)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drive())
        self._wake.set()
        try:
            await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self.steps.cancel(jobs)
            raise
        finally:
            for job in jobs:
                self._futures.pop(job.id, None)
        for job in jobs:
            if job.error is not None:
                raise job.error
        return jobs

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if self.steps.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            finished = await loop.run_in_executor(self._executor, self.steps.tick)
            for job in finished:
                fut = self._futures.get(job.id)
                if fut is not None and not fut.done():
                    fut.set_result(job)
