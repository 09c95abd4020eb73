"""Weighted fair queuing across tenants: the one policy of every stage's queue.

The Denoiser's waiting images (``StepScheduler``) and the TextEncoder's and the VAE's batches
(``FairBatcher``) each keep a ``FairQueue``, with the same tenant weights (``denoiser.tenant_weights``,
handed to every stage by ``build_app``).

Each tenant (API key, or the OpenAI ``user`` field) has a FIFO. A job's cost is
its work in the stage's unit (the Denoiser's: UNet rows x steps; a VAE decode's:
its images; a prompt's: 1); its virtual finish time is
``max(V, tenant's last finish) + cost / weight``, and the job with the
smallest finish time among the tenants' heads goes next (self-clocked fair
queuing: V is the finish time of the job last admitted). So while several
tenants have a backlog they share the stage's throughput by weight, FIFO within
a tenant, and no tenant starves: a newly active tenant starts at V, never
behind the flooders' accumulated backlog.

The queue itself is unbounded; its user bounds it (``StepScheduler`` refuses a
submit past ``max_queued`` waiting images per tenant, so a flood fills only its
own share, and past ``max_queued_total`` overall).

A job that cannot start yet (its adapters are loading) stays in place while
later ones pass it: ``in_order`` lists the waiting items in pop order and
``take`` admits one from the middle.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, weights: dict[str, float] | None = None, default_weight: float = 1.0):
        if default_weight <= 0:
            raise ValueError(f"default_weight must be > 0, got {default_weight}")
        for tenant, w in (weights or {}).items():
            if w <= 0:
                raise ValueError(f"tenant weight must be > 0, got {w} for {tenant!r}")
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self._queues: dict[str, deque[tuple[float, int, T]]] = {}
        self._last_finish: dict[str, float] = {}
        self._heads: list[tuple[float, int, str]] = []  # (finish, seq, tenant) of each tenant's head
        self._seq = itertools.count()
        self.virtual_time = 0.0
        self._len = 0
        self._ranks: dict[int, int] | None = None  # id(item) -> position; None after any change

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, self.default_weight)

    def push(self, tenant: str, item: T, cost: float, weight: float | None = None) -> None:
        """Queue ``item`` for ``tenant``. ``weight``: the tenant's weight from now on (a tenant key's, which an
        admin may change at run time); None: as before (the configured weights, else the default)."""
        if cost <= 0:
            raise ValueError(f"cost must be > 0, got {cost}")
        if weight is not None:
            if weight <= 0:
                raise ValueError(f"tenant weight must be > 0, got {weight} for {tenant!r}")
            self.weights[tenant] = weight
        start = max(self.virtual_time, self._last_finish.get(tenant, 0.0))
        finish = start + cost / self.weight(tenant)
        self._last_finish[tenant] = finish
        q = self._queues.setdefault(tenant, deque())
        entry = (finish, next(self._seq), item)
        q.append(entry)
        if len(q) == 1:
            heapq.heappush(self._heads, (finish, entry[1], tenant))
        self._len += 1
        self._ranks = None

    def push_front(self, tenant: str, item: T) -> None:
        """Put back an item admitted earlier (a job paused to make room: ``StepScheduler``) first in its tenant's
        FIFO. Its cost was charged when it was first pushed, so it is not charged again: its finish tag is the
        virtual time (or the tenant's head's, if earlier), and the tenant's later items keep theirs."""
        q = self._queues.setdefault(tenant, deque())
        finish = min(self.virtual_time, q[0][0]) if q else self.virtual_time
        entry = (finish, -next(self._seq), item)  # before any item of the same tag: it was admitted once already
        if q:
            self._heads = [h for h in self._heads if h[2] != tenant]
            heapq.heapify(self._heads)
        q.appendleft(entry)
        heapq.heappush(self._heads, (finish, entry[1], tenant))
        self._len += 1
        self._ranks = None

    def peek(self) -> T | None:
        if not self._heads:
            return None
        _, _, tenant = self._heads[0]
        return self._queues[tenant][0][2]

    def pop(self) -> T:
        finish, _, tenant = heapq.heappop(self._heads)
        q = self._queues[tenant]
        _, _, item = q.popleft()
        self.virtual_time = finish
        if q:
            heapq.heappush(self._heads, (q[0][0], q[0][1], tenant))
        else:
            del self._queues[tenant]
        self._len -= 1
        self._ranks = None
        return item

    def in_order(self) -> list[T]:
        """The waiting items in the order ``pop`` would return them (if nothing else arrived)."""
        tags = sorted((finish, seq, x) for q in self._queues.values() for finish, seq, x in q)
        return [x for _, _, x in tags]

    def take(self, item: T) -> bool:
        """Admit ``item`` out of order (the ones before it are not ready): ``pop`` for that item.

        The virtual time moves to its finish tag if that is later, as a pop would, so tenants
        that become active start behind work already admitted.
        """
        for q in self._queues.values():
            for finish, _, x in q:
                if x is item:
                    self.remove(item)
                    self.virtual_time = max(self.virtual_time, finish)
                    return True
        return False

    def remove(self, item: T) -> bool:
        """Drop a waiting item (cancelled); its tenant keeps its place otherwise."""
        for tenant, q in self._queues.items():
            for entry in q:
                if entry[2] is item:
                    was_head = q[0] is entry
                    q.remove(entry)
                    self._len -= 1
                    self._ranks = None
                    if was_head:
                        self._heads = [h for h in self._heads if h[2] != tenant]
                        heapq.heapify(self._heads)
                        if q:
                            heapq.heappush(self._heads, (q[0][0], q[0][1], tenant))
                    if not q:
                        del self._queues[tenant]
                    return True
        return False

    def position(self, item: T) -> int | None:
        """How many waiting items pop before ``item`` (0 = next), or None if it is not waiting.

        Pops go in (finish, seq) order over all tenants (each tenant's FIFO is sorted by
        finish), so this is the item's rank by that tag. It is the position now: a tenant
        that becomes active later may still cut in ahead (it starts at the virtual time,
        not behind the backlog). Ranks are computed once per change of the queue.
        """
        if self._ranks is None:
            tags = sorted((finish, seq, id(x)) for q in self._queues.values() for finish, seq, x in q)
            self._ranks = {key: rank for rank, (_, _, key) in enumerate(tags)}
        return self._ranks.get(id(item))

    def depth(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return len(q) if q else 0

    def depths(self) -> dict[str, int]:
        return {t: len(q) for t, q in self._queues.items()}

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        for q in self._queues.values():
            for entry in q:
                yield entry[2]
