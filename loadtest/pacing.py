"""Open-loop arrivals for locust users: a pacer per tenant lane hands out arrival tickets.

A greenlet emits tickets on a schedule into a queue; users of the lane block on
the queue, send one request per ticket and come back. The offered rate
therefore does not drop when the server slows down, as it would with
closed-loop users, until every user is busy: tickets waiting longer than
``max_lag_s`` are dropped (and counted), so a saturated client never releases
a burst of stale arrivals. A new schedule voids the tickets of the previous one.

Schedules: ``uniform`` (evenly spaced) or ``poisson``. For a stage of known
length, ``poisson`` draws the number of arrivals of each segment (warm-up,
measured window) as exactly ``rate x length`` (randomly rounded) and places them
uniformly at random inside it: a Poisson process conditioned on its count, as
bursty as Poisson traffic but offering exactly the stage's rate, so a short
stage does not measure a lucky (or unlucky) draw. Without a length it is a plain
Poisson process (exponential gaps).

Every ticket of a stage of known length ends one way: handed to a user
(``take``), ``dropped`` (too old), or ``voided`` (still queued, or not yet
emitted, when a new schedule replaced it), whatever the speed of the machine.
``clock`` and ``sleep`` default to wall-clock time and ``gevent.sleep``; tests
pass a virtual clock to drive a pacer deterministically.

Imports gevent but does not monkey-patch; only the locust process uses it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import gevent
from gevent.queue import Empty, Queue


class Pacer:
    def __init__(
        self,
        rng: random.Random,
        poisson: bool = True,
        max_lag_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = gevent.sleep,
    ):
        self.rng = rng
        self.poisson = poisson
        self.max_lag_s = max_lag_s
        self.rate = 0.0
        self.epoch = 0
        self.emitted = 0
        self.dropped = 0  # tickets nobody picked up within max_lag_s (every user busy)
        self.voided = 0  # tickets of a replaced schedule never handed out: still queued, or not yet emitted
        self._clock = clock
        self._sleep = sleep
        self._unemitted = 0  # tickets of the current (finite) schedule not emitted yet
        self._queue: Queue = Queue()
        self._emitter: gevent.Greenlet | None = None

    def set_rate(self, rate: float, segments_s: tuple[float, ...] = (), counts: tuple[int, ...] | None = None) -> None:
        """Emit at ``rate`` per second from now (0 pauses); voids tickets of the previous schedule.

        ``segments_s``: consecutive segments of a stage (e.g. warm-up, measured window), each
        given ``rate x length`` arrivals (randomly rounded), or ``counts[i]`` where given;
        after the last segment, emission stops.
        """
        if rate < 0 or any(x <= 0 for x in segments_s):
            raise ValueError(f"rate must be >= 0 and segments > 0, got {rate}, {segments_s}")
        if counts is not None and len(counts) != len(segments_s):
            raise ValueError(f"one count per segment: {counts} for {segments_s}")
        if self._emitter is not None:
            self._emitter.kill(block=False)
            self._emitter = None
        self.voided += self._unemitted
        self._unemitted = 0
        while not self._queue.empty():
            _, epoch = self._queue.get_nowait()
            self.voided += epoch == self.epoch
        self.epoch += 1
        self.rate = rate
        if rate > 0:
            times = self.schedule(rate, segments_s, self._clock(), counts) if segments_s else None
            self._unemitted = len(times) if times is not None else 0
            self._emitter = gevent.spawn(self._emit, rate, self.epoch, times)

    def schedule(
        self, rate: float, segments_s: tuple[float, ...], start: float, counts: tuple[int, ...] | None = None
    ) -> list[float]:
        """Arrival times for the segments (see the module docstring), sorted."""
        out: list[float] = []
        t0 = start
        for i, length in enumerate(segments_s):
            expected = rate * length
            n = counts[i] if counts is not None else int(expected) + (self.rng.random() < expected - int(expected))
            if self.poisson:
                out += sorted(t0 + self.rng.random() * length for _ in range(n))
            else:
                out += [t0 + (k + 0.5) * length / n for k in range(n)]
            t0 += length
        return out

    def _emit(self, rate: float, epoch: int, times: list[float] | None) -> None:
        at = self._clock()
        k = 0
        while True:
            if times is not None:
                if k >= len(times):
                    return
                at = times[k]
                k += 1
            else:
                at += self.rng.expovariate(rate) if self.poisson else 1.0 / rate
            delay = at - self._clock()
            if delay > 0:
                self._sleep(delay)
            if epoch != self.epoch:
                return  # replaced while asleep (its tickets are counted as voided)
            self._queue.put((at, epoch))
            self.emitted += 1
            if times is not None:
                self._unemitted -= 1

    def take(self, timeout_s: float = 0.25) -> float | None:
        """Block for the next ticket; returns its scheduled time, or None (nothing within ``timeout_s``)."""
        deadline = self._clock() + timeout_s
        while True:
            try:
                at, epoch = self._queue.get(timeout=max(0.0, deadline - self._clock()))
            except Empty:
                return None
            if epoch != self.epoch:
                continue
            if self._clock() - at > self.max_lag_s:
                self.dropped += 1
                continue
            return at

    def stop(self) -> None:
        self.set_rate(0)
