"""Which adapter sits in which slot of a ``MultiLoRAModel``: LRU among the unpinned, pins while in use.

Slot 0 means "no adapter"; slots 1..num_slots-1 hold adapters. An adapter used
by a queued or running request is pinned and never evicted; loading copies
weights into a free slot that no running forward reads, so it happens beside
the running batch without stalling it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class NoFreeSlotError(RuntimeError):
    """Every slot holds a pinned adapter; wait for a request to finish."""


class AdapterSlots:
    def __init__(self, num_slots: int, load: Callable[[int, Hashable], None], clear: Callable[[int], None]):
        """``load(slot, key)`` copies adapter ``key`` into ``slot``; ``clear(slot)`` empties it."""
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is 'no adapter'), got {num_slots}")
        self._load = load
        self._clear = clear
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(num_slots - 1, 0, -1))
        self._pins: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Event] = {}
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self.load_seconds = 0.0
        # observer(event, key, seconds): "hit", "load" (with its duration) or "evict", for metrics.
        self.observer: Callable[[str, Hashable, float], None] | None = None

    def _notify(self, event: str, key: Hashable, seconds: float = 0.0) -> None:
        if self.observer is not None:
            self.observer(event, key, seconds)

    @property
    def capacity(self) -> int:
        return len(self._free) + len(self._slots)

    def resident(self) -> dict[Hashable, int]:
        with self._lock:
            return dict(self._slots)

    def pinned(self) -> dict[Hashable, int]:
        with self._lock:
            return dict(self._pins)

    def acquire(self, keys: list[Hashable]) -> list[int]:
        """Pin ``keys`` (loading those not resident) and return their slots.

        All or nothing: if a slot cannot be found for every key, nothing stays
        pinned and ``NoFreeSlotError`` is raised.
        """
        taken: list[Hashable] = []
        try:
            return [self._acquire_one(k, taken) for k in keys]
        except BaseException:
            self.release(taken)
            raise

    def _acquire_one(self, key: Hashable, taken: list) -> int:
        while True:
            with self._lock:
                if key in self._slots:
                    if key in self._loading:
                        event = self._loading[key]
                    else:
                        self._slots.move_to_end(key)
                        self._pins[key] = self._pins.get(key, 0) + 1
                        taken.append(key)
                        self.hits += 1
                        slot = self._slots[key]
                        self._notify("hit", key)
                        return slot
                else:
                    slot = self._take_slot()
                    self._slots[key] = slot
                    self._pins[key] = self._pins.get(key, 0) + 1
                    taken.append(key)
                    event = threading.Event()
                    self._loading[key] = event
                    break
            event.wait()  # another caller is loading this key: the load is done once
        start = time.perf_counter()
        try:
            self._load(slot, key)
        except BaseException:
            with self._lock:
                self._slots.pop(key, None)
                self._pins.pop(key, None)
                taken.remove(key)
                self._free.append(slot)
                self._loading.pop(key).set()
            self._clear(slot)
            raise
        seconds = time.perf_counter() - start
        with self._lock:
            self.loads += 1
            self.load_seconds += seconds
            self._loading.pop(key).set()
        self._notify("load", key, seconds)
        return slot

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._slots:  # least recently used first
            if not self._pins.get(victim) and victim not in self._loading:
                slot = self._slots.pop(victim)
                self.evictions += 1
                self._notify("evict", victim)
                return slot
        raise NoFreeSlotError(f"all {len(self._slots)} adapter slots are pinned by running requests")

    def release(self, keys: list[Hashable]) -> None:
        with self._lock:
            for key in keys:
                n = self._pins.get(key, 0) - 1
                if n > 0:
                    self._pins[key] = n
                else:
                    self._pins.pop(key, None)

    def evict(self, key: Hashable) -> bool:
        """Drop an unpinned adapter now (e.g. deleted from the registry); False if pinned or absent."""
        with self._lock:
            if key not in self._slots or self._pins.get(key) or key in self._loading:
                return False
            slot = self._slots.pop(key)
            self._free.append(slot)
            self.evictions += 1
        self._clear(slot)
        return True
