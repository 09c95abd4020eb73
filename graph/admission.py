"""Admission control at the ingress: past the measured capacity, a tenant over its fair share is refused
early (503 ``overloaded`` with ``Retry-After``) and a tenant within it waits in weighted-fair order.

Every generation path passes here (``auth.GatedGraph``: native, img2img/inpaint, OpenAI, A1111; ``auth.held_job``:
async jobs), per base model (``Plan.model``), after the tenant's quotas (429) and before any stage is called.

**Capacity.** The images a model's graph may hold from this replica at once: ``admission.max_images_in_flight``
if set, else the measured throughput (images completed per busy second, decayed with
``admission.throughput_half_life_s``: ``Throughput``) times ``admission.target_queue_s``, never below
``admission.min_images_in_flight`` (so a cold start admits). An image is in flight from its admission to the end
of its run.

**Decision** (``ModelAdmission.enter``), for a request of ``n`` images from tenant ``t``:

- under capacity (in flight + waiting + n <= capacity): admitted, it runs now;
- past it, ``t`` is over its fair share if ``held(t) > 0`` and ``held(t) + n > capacity * w(t) / W``, where
  ``held`` counts its images in flight and waiting and ``W`` sums the weights of the tenants with work (``t``
  included): refused, 503 with ``Retry-After`` = the seconds the measured throughput needs, at ``t``'s share of
  it, to bring ``t`` back within its share (1 ... ``admission.max_retry_after_s``);
- else admitted to wait: tickets wait in a ``FairQueue`` (the Denoiser's queue: one policy, cost = images) and
  are released in its order as images complete (the head waits until it fits; with nothing in flight it goes).

So a tenant never waits behind another's flood: its first request is always admitted (``held(t) == 0``), and
while several tenants have work each holds about its weighted share of the graph.

Weights are the tenant key's (``Tenant.weight``), else ``denoiser.tenant_weights``, else 1: the ones every stage
uses. Several ingress replicas: each admits for itself, with its own measurement (its completions are its share
of the traffic) or its own fixed ``max_images_in_flight``; Serve's router spreads requests over replicas.

No Ray here; the clock is injectable (tests drive it; nothing sleeps).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.engine.fair_queue import FairQueue

from .config import AdmissionConfig
from .errors import APIError


class Throughput:
    """Images completed per second of busy time (some image in flight), exponentially decayed.

    Both sums decay with time constant ``half_life_s / ln 2``; the rate is their ratio, so for a steady stream
    it is the stream's rate from the first completion on, and idle time (nothing in flight) neither lowers nor
    raises it: an idle server is not a slow one.

    >>> now = [0.0]
    >>> t = Throughput(30.0, clock=lambda: now[0])
    >>> t.busy(True); now[0] = 2.0; t.completed(4); round(t.rate(), 2)  # a burst at the end weighs a bit more
    2.05
    """

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic):
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.tau = half_life_s / math.log(2)
        self.clock = clock
        self.images = 0.0  # decayed images completed
        self.busy_s = 0.0  # decayed busy seconds
        self.at = clock()
        self.is_busy = False

    def _advance(self) -> None:
        now = self.clock()
        dt = max(0.0, now - self.at)
        decay = math.exp(-dt / self.tau)
        self.images *= decay
        self.busy_s = self.busy_s * decay + (self.tau * (1.0 - decay) if self.is_busy else 0.0)
        self.at = now

    def busy(self, is_busy: bool) -> None:
        """Whether some image is in flight from now on."""
        self._advance()
        self.is_busy = is_busy

    def completed(self, images: int) -> None:
        self._advance()
        self.images += images

    def rate(self) -> float | None:
        """Images per busy second, or None before the first completion."""
        self._advance()
        if self.images <= 0 or self.busy_s <= 0:
            return None
        return self.images / self.busy_s


@dataclass(eq=False)
class Ticket:
    """One admitted request's images: in flight once ``granted``, else waiting in the fair queue."""

    model: str
    tenant: str
    images: int
    weight: float
    since: float  # when it was admitted (clock seconds)
    granted: bool = False
    waited_s: float = 0.0  # from admission to grant
    future: asyncio.Future | None = field(default=None, repr=False)  # set when it has to wait


class Overloaded(Exception):
    """Past capacity and over the tenant's fair share (``ModelAdmission.enter``)."""

    def __init__(self, held: int, images: int, share: float, capacity: int, retry_after_s: float):
        self.held = held
        self.images = images
        self.share = share
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    @property
    def message(self) -> str:
        # One line; it names the tenant's share and never a tenant id, key, address or path.
        return (
            f"overloaded: your requests hold {self.held} images in flight or waiting and this one asks "
            f"{self.images}, past your fair share of {self.share:.3g} of the {self.capacity} the server takes "
            f"now; retry after {self.retry_after_s:g} s"
        )

    def api_error(self) -> APIError:
        return APIError(503, "overloaded", self.message, None, {"Retry-After": str(int(self.retry_after_s))})


class ModelAdmission:
    """One base model's capacity, images in flight and fair wait queue (see the module's docstring)."""

    def __init__(
        self,
        config: AdmissionConfig,
        tenant_weights: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: str = "",
    ):
        self.config = config
        self.model = model
        self.clock = clock
        self.throughput = Throughput(config.throughput_half_life_s, clock)
        self.waiting: FairQueue[Ticket] = FairQueue(tenant_weights)
        self.in_flight: dict[str, int] = {}  # tenant -> images granted and not yet done
        self.queued: dict[str, int] = {}  # tenant -> images waiting
        self._weights: dict[str, float] = {}  # tenant -> weight last seen (key weights change at run time)

    # -- the numbers ------------------------------------------------------------------------------

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant) or self.waiting.weight(tenant)

    def capacity(self) -> int:
        """Images this replica lets into the model's graph at once."""
        if self.config.max_images_in_flight is not None:
            return self.config.max_images_in_flight
        rate = self.throughput.rate()
        measured = 0 if rate is None else math.floor(rate * self.config.target_queue_s)
        return max(self.config.min_images_in_flight, measured)

    def images_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def images_waiting(self) -> int:
        return sum(self.queued.values())

    def held(self, tenant: str) -> int:
        return self.in_flight.get(tenant, 0) + self.queued.get(tenant, 0)

    def share(self, tenant: str, capacity: int) -> float:
        """``tenant``'s fair share of ``capacity``: by weight among the tenants with work, itself included."""
        active = set(self.in_flight) | set(self.queued) | {tenant}
        return capacity * self.weight(tenant) / sum(self.weight(t) for t in active)

    def retry_after_s(self, tenant: str, excess: float, capacity: int) -> int:
        """Seconds until ``excess`` of ``tenant``'s images complete at its share of the measured throughput
        (``target_queue_s`` before any is measured); an integer in 1 ... ``max_retry_after_s``."""
        rate = self.throughput.rate()
        if rate is None:
            seconds = self.config.target_queue_s
        else:
            seconds = excess / (rate * self.share(tenant, capacity) / capacity)
        return int(min(self.config.max_retry_after_s, max(1, math.ceil(seconds))))

    # -- admission ------------------------------------------------------------------------------

    def enter(self, tenant: str, images: int, weight: float | None = None, wait: bool = True) -> Ticket:
        """Admit ``images`` for ``tenant`` (granted now, or waiting if ``wait``), or raise ``Overloaded``.

        ``weight``: the tenant key's weight (None: ``denoiser.tenant_weights``, else 1). ``wait=False`` (a job,
        whose run happens in the Jobs replica): admitted within its share is granted at once, past capacity or
        not; over its share it is refused as any request."""
        if images < 1:
            raise ValueError(f"images must be >= 1, got {images}")
        if weight is not None:
            if weight <= 0:
                raise ValueError(f"tenant weight must be > 0, got {weight}")
            self._weights[tenant] = weight
        capacity = self.capacity()
        total = self.images_in_flight() + self.images_waiting()
        held = self.held(tenant)
        if total + images > capacity and held > 0:
            share = self.share(tenant, capacity)
            if held + images > share:
                retry = self.retry_after_s(tenant, held + images - share, capacity)
                raise Overloaded(held, images, share, capacity, retry)
        ticket = Ticket(self.model, tenant, images, self.weight(tenant), self.clock())
        if not wait or total + images <= capacity:
            self._grant(ticket)
            return ticket
        ticket.future = asyncio.get_running_loop().create_future()
        self.waiting.push(tenant, ticket, images, weight)
        self.queued[tenant] = self.queued.get(tenant, 0) + images
        self.pump()
        return ticket

    def check(self, tenant: str, images: int, weight: float | None = None) -> None:
        """Raise ``Overloaded`` if ``enter`` would refuse now (a stream's 503 before its 200); admits nothing."""
        ticket = self.enter(tenant, images, weight, wait=False)
        self.leave(ticket, completed=False)

    def leave(self, ticket: Ticket, completed: bool) -> None:
        """The ticket's run ended (``completed``: its images were made, counted in the throughput), or it
        stopped waiting (its client went away); waiting tickets that now fit are released in fair order."""
        if ticket.granted:
            left = self.in_flight.get(ticket.tenant, 0) - ticket.images
            if left > 0:
                self.in_flight[ticket.tenant] = left
            else:
                self.in_flight.pop(ticket.tenant, None)
            if completed:
                self.throughput.completed(ticket.images)
            self.throughput.busy(bool(self.in_flight))
        elif self.waiting.remove(ticket):
            self._unqueue(ticket)
        self.pump()

    def pump(self) -> None:
        """Release waiting tickets in fair order while the head fits (or nothing is in flight)."""
        capacity = self.capacity()
        while self.waiting:
            head = self.waiting.peek()
            if self.in_flight and self.images_in_flight() + head.images > capacity:
                return
            self.waiting.pop()
            self._unqueue(head)
            self._grant(head)

    def position(self, ticket: Ticket) -> tuple[int, float | None]:
        """A waiting ticket's place: (tickets released before it, 0 = next; seconds until its release at the
        measured throughput, None before any is measured). A granted ticket: (0, 0.0)."""
        if ticket.granted:
            return 0, 0.0
        position = self.waiting.position(ticket)
        if position is None:
            return 0, 0.0
        ahead = sum(t.images for t in self.waiting.in_order()[:position])
        rate = self.throughput.rate()
        over = self.images_in_flight() + ahead + ticket.images - self.capacity()
        return position, None if rate is None else max(0, over) / rate

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        ticket.waited_s = max(0.0, self.clock() - ticket.since)
        self.in_flight[ticket.tenant] = self.in_flight.get(ticket.tenant, 0) + ticket.images
        self.throughput.busy(True)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.set_result(None)

    def _unqueue(self, ticket: Ticket) -> None:
        left = self.queued.get(ticket.tenant, 0) - ticket.images
        if left > 0:
            self.queued[ticket.tenant] = left
        else:
            self.queued.pop(ticket.tenant, None)


class Admission:
    """The ingress replica's admission, one ``ModelAdmission`` per base model (``Plan.model``).

    ``metrics`` (optional): ``overloaded(tenant)``, ``queue_wait(tenant, stage, ms)`` and
    ``admission(model, capacity, in_flight, waiting)`` (``auth.TenantMetrics``)."""

    def __init__(
        self,
        config: AdmissionConfig,
        tenant_weights: dict[str, dict[str, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics=None,
    ):
        self.config = config
        self.tenant_weights = tenant_weights or {}  # model -> denoiser.tenant_weights
        self.clock = clock
        self.metrics = metrics
        self.models: dict[str, ModelAdmission] = {}

    def model(self, name: str) -> ModelAdmission:
        admission = self.models.get(name)
        if admission is None:
            weights = self.tenant_weights.get(name)
            if weights is None and len(self.tenant_weights) == 1:
                weights = next(iter(self.tenant_weights.values()))
            admission = self.models[name] = ModelAdmission(self.config, weights, self.clock, name)
        return admission

    def check(self, model: str, tenant: str, images: int, weight: float | None = None) -> None:
        """503 now if a request would be refused (a stream, whose 200 comes first); admits nothing."""
        if not self.config.enabled:
            return
        try:
            self.model(model).check(tenant, images, weight)
        except Overloaded as e:
            self._refused(tenant)
            raise e.api_error() from None

    async def admit(self, model: str, tenant: str, images: int, weight: float | None = None) -> Ticket | None:
        """Admit a request and wait for its turn (fair order); 503 if refused. None when admission is off.
        If the caller goes away while it waits, it leaves the queue."""
        if not self.config.enabled:
            return None
        admission = self.model(model)
        try:
            ticket = admission.enter(tenant, images, weight)
        except Overloaded as e:
            self._refused(tenant)
            raise e.api_error() from None
        if not ticket.granted:
            self._gauges(admission)
            try:
                await asyncio.shield(ticket.future)
            except asyncio.CancelledError:
                admission.leave(ticket, completed=False)  # out of the queue, or back if granted meanwhile
                self._gauges(admission)
                raise
        if self.metrics is not None:
            self.metrics.queue_wait(tenant, "admission", 1000.0 * ticket.waited_s)
        self._gauges(admission)
        return ticket

    def hold(self, model: str, tenant: str, images: int, weight: float | None = None) -> Ticket | None:
        """Admit a job's images without waiting (503 if refused): held until ``leave``. None when off."""
        if not self.config.enabled:
            return None
        admission = self.model(model)
        try:
            ticket = admission.enter(tenant, images, weight, wait=False)
        except Overloaded as e:
            self._refused(tenant)
            raise e.api_error() from None
        self._gauges(admission)
        return ticket

    def leave(self, ticket: Ticket | None, completed: bool) -> None:
        if ticket is None:
            return
        admission = self.model(ticket.model)
        admission.leave(ticket, completed)
        self._gauges(admission)

    def position(self, ticket: Ticket) -> tuple[int, float | None]:
        """A waiting request's place in its model's fair wait queue and its ETA (``ModelAdmission.position``)."""
        return self.model(ticket.model).position(ticket)

    def stats(self) -> dict:
        """Per model: capacity, images in flight and waiting by tenant, measured images/s (None: not yet)."""
        return {
            name: {
                "capacity": m.capacity(),
                "in_flight": dict(m.in_flight),
                "waiting": dict(m.queued),
                "images_per_s": m.throughput.rate(),
            }
            for name, m in self.models.items()
        }

    def _refused(self, tenant: str) -> None:
        if self.metrics is not None:
            self.metrics.request(tenant, "overloaded")

    def _gauges(self, admission: ModelAdmission) -> None:
        if self.metrics is not None:
            self.metrics.admission(
                admission.model, admission.capacity(), admission.images_in_flight(), admission.images_waiting()
            )
