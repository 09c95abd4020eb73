"""Weighted-fair batching: the TextEncoder's and the VAE's batches, formed tenant by tenant.

Ray Serve's ``@serve.batch`` queues callers FIFO, so one tenant's backlog delays everyone behind
it. ``FairBatcher`` keeps the same contract (a caller awaits ``submit`` and gets its own result;
a loop forms batches of up to ``max_batch_size``, waiting at most ``batch_wait_timeout_s`` after
the first arrival for more, and runs one batch at a time) but callers wait in a ``FairQueue``:
each batch is filled, up to its size, from whoever is waiting, in weighted-fair order (the same
policy and the same tenant weights as the Denoiser's queue). A light tenant arriving behind a
heavy tenant's backlog is in the next batch, and backlogged tenants share batches by weight.
With a single tenant the order is FIFO and batches are exactly ``@serve.batch``'s.

Errors reach the right callers: an exception raised by the batch function goes to every caller
of that batch; an exception returned in place of one result goes to that caller only. A caller
that goes away (its task cancelled) while waiting leaves the queue; one whose batch already runs
just does not get the result.

No Ray here; the loop runs on the event loop of the first ``submit``. ``sleep`` (the batch wait)
is injectable, so tests drive the loop without a wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .fair_queue import FairQueue

I = TypeVar("I")  # noqa: E741 - an item, as a batch function takes it
R = TypeVar("R")


@dataclass(eq=False)
class _Waiting(Generic[I]):
    tenant: str
    item: I
    future: asyncio.Future = field(repr=False)
    since: float = 0.0  # when it was submitted (the batcher's clock)
    waited_s: float = 0.0  # from submit until its batch started


class FairBatcher(Generic[I, R]):
    """``await submit(tenant, item, cost)`` -> ``batch_fn([items])[k]`` for that item.

    ``batch_fn`` takes the items of one batch (up to ``max_batch_size``, in fair order) and returns
    one result per item, in order; a ``BaseException`` in place of a result is raised to that
    item's caller. ``cost`` is the item's work in the stage's own unit (a prompt, an image): a
    tenant's share of batch slots is by weight over its cost.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[I]], Awaitable[list[R]]],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        tenant_weights: dict[str, float] | None = None,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.waiting: FairQueue[_Waiting[I]] = FairQueue(tenant_weights)
        self.batches = 0  # batches run so far
        self._sleep = sleep
        self._clock = clock
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, tenant: str, item: I, cost: float = 1.0, weight: float | None = None) -> R:
        """Wait for ``item``'s turn in a batch and return its result (or raise its error).

        ``weight``: the tenant's weight from now on (a tenant key's, set by the server, which an admin may
        change at run time); None: as configured (``tenant_weights``, else 1).
        """
        return (await self.submit_timed(tenant, item, cost, weight))[0]

    async def submit_timed(
        self, tenant: str, item: I, cost: float = 1.0, weight: float | None = None
    ) -> tuple[R, float]:
        """``submit``, and the milliseconds ``item`` waited in the queue before its batch started (the
        stage's queue wait, reported per tenant: ``lorafleet_tenant_queue_wait_ms``)."""
        self._start()
        entry = _Waiting(tenant, item, asyncio.get_running_loop().create_future(), self._clock())
        self.waiting.push(tenant, entry, cost, weight)
        self._arrived.set()
        try:
            return await asyncio.shield(entry.future), 1000.0 * entry.waited_s
        except asyncio.CancelledError:
            # Gone: out of the queue if it still waits; if its batch runs, the result is dropped.
            if not entry.future.done():
                self.waiting.remove(entry)
                entry.future.cancel()
            raise

    def depths(self) -> dict[str, int]:
        """Waiting items per tenant (not those in the batch that runs)."""
        return self.waiting.depths()

    async def next_batch(self) -> list[_Waiting[I]]:
        """Wait for a first item, then up to ``batch_wait_timeout_s`` for the batch to fill; take up
        to ``max_batch_size`` waiting items in fair order."""
        self._ensure_event()
        while not self.waiting:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self.waiting) < self.max_batch_size and self.batch_wait_timeout_s > 0:
            timer = asyncio.ensure_future(self._sleep(self.batch_wait_timeout_s))
            try:
                while len(self.waiting) < self.max_batch_size and not timer.done():
                    self._arrived.clear()
                    arrival = asyncio.ensure_future(self._arrived.wait())
                    try:
                        await asyncio.wait({arrival, timer}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        arrival.cancel()
            finally:
                timer.cancel()
        batch = []
        now = self._clock()
        while self.waiting and len(batch) < self.max_batch_size:
            entry = self.waiting.pop()
            entry.waited_s = max(0.0, now - entry.since)
            batch.append(entry)
        return batch  # may be empty: every waiting caller went away during the wait

    async def run_batch(self, batch: list[_Waiting[I]]) -> None:
        """Run ``batch_fn`` on one batch and hand each caller its result or error."""
        if not batch:
            return
        self.batches += 1
        try:
            results = await self.batch_fn([entry.item for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets it
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(e)
            return
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():  # its caller went away
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    async def run_forever(self) -> None:
        """Form and run batches, one at a time (as ``@serve.batch``'s ``max_concurrent_batches=1``)."""
        while True:
            await self.run_batch(await self.next_batch())

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    def _ensure_event(self) -> None:
        if self._arrived is None:
            self._arrived = asyncio.Event()

    def _start(self) -> None:
        self._ensure_event()
        if self._loop_task is None or self._loop_task.done():
            if self._loop_task is not None and not self._loop_task.cancelled():
                with contextlib.suppress(BaseException):
                    self._loop_task.result()  # retrieved: a crashed loop restarts on the next submit
            # In a context of its own: not the first caller's (a request id there would tag every batch).
            self._loop_task = asyncio.get_running_loop().create_task(self.run_forever(), context=contextvars.Context())
