"""Which adapters are resident in a ``MultiLoRAModel``, loaded in the background, pinned only while they run.

A ``MultiLoRAModel`` has slots (handles: slot 0 means "no adapter") and a pool
of pages (one rank of one adapter over every layer; see ``multi_lora``). An
adapter of rank r takes one slot and r pages, so memory is paid per rank.

``AdapterResidency`` decides what sits there:

- **Pins** are taken by ``try_pin`` when a request is *admitted* (it runs at
  the next tick) and dropped by ``release`` when it leaves the batch. A waiting
  request holds nothing: it only *wants* its adapters (``want``).
- **Loads run beside the batch.** ``want`` takes the waiting requests' adapter
  sets in fair order; a background thread loads what is missing, first the
  sets nearest the front (the next request's first: that is the prefetch),
  fetching weights from the registry (host memory, disk or S3) and copying
  them into free pages. No lock the tick needs is held while it copies, and a
  running forward never reads a slot that is being written (only pinned slots
  are routed).
- **Eviction** frees the least recently used unpinned adapter that no request
  nearer the front wants. When nothing can be freed (every page pinned by
  running requests) the load is ``BLOCKED`` until a release.

States of an adapter: ``LOADING`` (queued or being fetched/copied),
``BLOCKED`` (weights fetched, waiting for memory), ``READY`` (resident) and
``FAILED`` (the error is raised to the requests that want it, then forgotten
once no request wants it, so a later request retries).

All methods are thread-safe. ``on_change()`` is called (from the loader
thread) whenever an adapter becomes ``READY`` or ``FAILED``: the denoise loop
waits on it instead of spinning while every waiting request waits for a load.

>>> residency = AdapterResidency(lora, fetch=lambda ref: weights_of(ref))   # doctest: +SKIP
>>> residency.want([["ink@1"], ["oil@2", "ink@1"]])   # the waiting requests, next first
>>> residency.try_pin(["ink@1"])                      # None until loaded, then its slots
[1]
>>> residency.release(["ink@1"])
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Weights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A, B, alpha)


class AdapterBudgetError(ValueError):
    """A request's adapters can never be resident together on this replica (too many pages or slots)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.message,)


class PagedMemory(Protocol):
    """What residency needs of a ``MultiLoRAModel``."""

    num_slots: int
    total_pages: int
    free_pages: int
    page_bytes: int

    def pages_needed(self, weights: Weights) -> int: ...
    def load(self, slot: int, weights: Weights) -> None: ...
    def clear(self, slot: int) -> None: ...


class State(enum.Enum):
    LOADING = "loading"
    BLOCKED = "blocked"
    READY = "ready"
    FAILED = "failed"


_NOT_WANTED = float("inf")


@dataclass(eq=False)
class _Entry:
    key: Hashable
    state: State = State.LOADING
    slot: int = 0  # 0 until placed
    rank: int | None = None  # pages it takes; known once fetched
    weights: Weights | None = None  # host copy, dropped once resident
    error: BaseException | None = None
    pins: int = 0
    priority: float = _NOT_WANTED  # index of the first waiting request that wants it
    busy: bool = False  # a loader thread is working on it
    blocked_at: int = -1  # the memory generation it was blocked at; retried once memory changes
    pinned_before: bool = False  # pinned at least once since loaded (the first pin is the miss)
    last_used: int = 0


class AdapterResidency:
    def __init__(
        self,
        memory: PagedMemory,
        fetch: Callable[[Hashable], Weights],
        *,
        loader_threads: int = 2,
        on_change: Callable[[], None] | None = None,
    ):
        """``fetch(key)`` returns an adapter's weights (``{module path: (A, B, alpha)}``) in host memory."""
        if memory.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is 'no adapter'), got {memory.num_slots}")
        self.memory = memory
        self._fetch = fetch
        self.on_change = on_change
        # observer(event, key, seconds): "hit", "miss", "load" (its seconds), "prefetch", "evict"; for metrics.
        self.observer: Callable[[str, Hashable, float], None] | None = None
        self._entries: dict[Hashable, _Entry] = {}
        self._free_slots = list(range(memory.num_slots - 1, 0, -1))
        self._cond = threading.Condition()
        self._memory_lock = threading.Lock()  # held while pages are allocated, written or freed
        self._clock = 0  # LRU order
        self._generation = 0  # bumped when memory may have become free: blocked loads retry
        self._closed = False
        self.loads = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.prefetches = 0
        self.load_seconds = 0.0
        self._threads = [
            threading.Thread(target=self._loader, name=f"adapter-loader-{i}", daemon=True)
            for i in range(loader_threads)
        ]
        for t in self._threads:
            t.start()

    # -- what the scheduler calls -------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Adapters that fit by slot count (memory may hold fewer: see ``memory_bytes``)."""
        return self.memory.num_slots - 1

    def check(self, keys: Sequence[Hashable]) -> None:
        """Raise ``AdapterBudgetError`` if ``keys`` can never be resident together (ranks known so far)."""
        if len(set(keys)) > self.capacity:
            raise AdapterBudgetError(
                f"{len(set(keys))} adapters in one request; a replica holds at most {self.capacity} at once"
            )
        with self._cond:
            ranks = [e.rank for k in set(keys) if (e := self._entries.get(k)) is not None and e.rank is not None]
        total = self.memory.total_pages
        if sum(ranks) > total:
            raise AdapterBudgetError(
                f"the request's adapters need {sum(ranks)} rank pages together; a replica holds {total} "
                f"(lora.slot_memory_bytes)"
            )

    def want(self, wanted: Sequence[Sequence[Hashable]]) -> None:
        """The waiting requests' adapter sets, next first: load what is missing, in that order.

        Replaces the previous call's list. Adapters no longer wanted stay resident
        (evictable) or finish their load; queued loads of them are dropped, and so are
        failures nobody waits for.
        """
        priority: dict[Hashable, int] = {}
        for i, keys in enumerate(wanted):
            for key in keys:
                priority.setdefault(key, i)
        with self._cond:
            for key, entry in list(self._entries.items()):
                p = priority.get(key)
                if p is None:
                    entry.priority = _NOT_WANTED
                    if entry.state in (State.FAILED, State.BLOCKED) or (
                        entry.state is State.LOADING and not entry.busy
                    ):
                        self._drop(entry)
                else:
                    entry.priority = p
            self._generation += 1  # other priorities: other adapters may be evicted now
            for key, p in priority.items():
                if key not in self._entries:
                    self._entries[key] = _Entry(key, priority=p)
            self._cond.notify_all()

    def try_pin(self, keys: Sequence[Hashable], *, only_if_pinned: bool = False) -> list[int] | None:
        """Pin ``keys`` and return their slots if all are resident, else ``None`` (and nothing pinned).

        Raises a failed load's error, or ``AdapterBudgetError``. ``only_if_pinned``: succeed only if
        every key is already pinned by a running request (taking no memory a blocked load needs).
        """
        if not keys:
            return []
        self.check(keys)
        with self._cond:
            entries = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    return None
                if entry.state is State.FAILED:
                    assert entry.error is not None
                    raise entry.error
                if entry.state is not State.READY or (only_if_pinned and not entry.pins):
                    return None
                entries.append(entry)
            events = []
            for entry in entries:
                entry.pins += 1
                self._clock += 1
                entry.last_used = self._clock
                if entry.pinned_before:
                    self.hits += 1
                    events.append(("hit", entry.key))
                else:
                    entry.pinned_before = True
                    self.misses += 1
                    events.append(("miss", entry.key))
            slots = [e.slot for e in entries]
        for event, key in events:
            self._notify(event, key)
        return slots

    def release(self, keys: Sequence[Hashable]) -> None:
        """Unpin ``keys`` (once each, as pinned); blocked loads may proceed."""
        if not keys:
            return
        with self._cond:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.pins <= 0:
                    raise RuntimeError(f"release of {key!r}, which is not pinned")
                entry.pins -= 1
                if entry.pins == 0:
                    self._generation += 1
            self._cond.notify_all()

    def evict(self, key: Hashable) -> bool:
        """Drop an unpinned resident adapter now (e.g. deleted from the registry); False if pinned or absent."""
        with self._memory_lock:
            with self._cond:
                entry = self._entries.get(key)
                if entry is None or entry.state is not State.READY or entry.pins:
                    return False
                self._drop(entry)
                slot = entry.slot
                self._generation += 1
            self.memory.clear(slot)
            with self._cond:
                self._free_slots.append(slot)
                self.evictions += 1
                self._cond.notify_all()
        self._notify("evict", key)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- what operators see ------------------------------------------------------------------------

    def state(self, key: Hashable) -> State | None:
        with self._cond:
            entry = self._entries.get(key)
            return entry.state if entry is not None else None

    def blocked(self, keys: Sequence[Hashable]) -> bool:
        """Is any of ``keys`` waiting for memory that only a release can free?"""
        with self._cond:
            return any((e := self._entries.get(k)) is not None and e.state is State.BLOCKED for k in keys)

    def resident(self) -> dict[Hashable, int]:
        """``{key: slot}`` of the adapters in memory."""
        with self._cond:
            return {e.key: e.slot for e in self._entries.values() if e.state is State.READY}

    def pinned(self) -> dict[Hashable, int]:
        """``{key: pins}`` of the adapters running requests use."""
        with self._cond:
            return {e.key: e.pins for e in self._entries.values() if e.pins}

    def resident_by_rank(self) -> dict[int, int]:
        with self._cond:
            return dict(Counter(e.rank for e in self._entries.values() if e.state is State.READY and e.rank))

    def memory_bytes(self) -> tuple[int, int]:
        """``(used, total)`` bytes of adapter pages."""
        m = self.memory
        return (m.total_pages - m.free_pages) * m.page_bytes, m.total_pages * m.page_bytes

    def consistent(self) -> bool:
        """The slot table's counters agree: every slot free or held once, pages match ranks, no negative pins."""
        with self._cond:
            held = [e.slot for e in self._entries.values() if e.slot]
            ok = len(held) == len(set(held)) and not set(held) & set(self._free_slots)
            ok = ok and len(held) + len(self._free_slots) == self.capacity
            ok = ok and all(e.pins >= 0 for e in self._entries.values())
            ok = ok and all(e.pins == 0 for e in self._entries.values() if e.state is not State.READY)
            ranks = sum(e.rank or 0 for e in self._entries.values() if e.slot)
            return ok and ranks == self.memory.total_pages - self.memory.free_pages

    # -- the loader ------------------------------------------------------------------------------

    def _notify(self, event: str, key: Hashable, seconds: float = 0.0) -> None:
        if self.observer is not None:
            self.observer(event, key, seconds)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _drop(self, entry: _Entry) -> None:
        """Forget ``entry`` (caller holds ``_cond``; a placed entry's slot is the caller's to free)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]

    def _next_job(self) -> _Entry | None:
        """The wanted entry nearest the front that a loader can work on now (caller holds ``_cond``)."""
        best = None
        for entry in self._entries.values():
            if entry.busy or entry.priority == _NOT_WANTED:
                continue
            if entry.state is State.LOADING or (entry.state is State.BLOCKED and entry.blocked_at < self._generation):
                if best is None or entry.priority < best.priority:
                    best = entry
        return best

    def _loader(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (entry := self._next_job()) is None:
                    self._cond.wait()
                if self._closed:
                    return
                entry.busy = True
            try:
                self._load(entry)
            finally:
                with self._cond:
                    entry.busy = False
                    self._cond.notify_all()

    def _load(self, entry: _Entry) -> None:
        start = time.perf_counter()
        try:
            if entry.weights is None:
                if entry.priority > 0:  # not for the request next in line: ahead of need
                    with self._cond:
                        self.prefetches += 1
                    self._notify("prefetch", entry.key)
                weights = self._fetch(entry.key)
                rank = self.memory.pages_needed(weights)
                if rank > self.memory.total_pages:
                    raise AdapterBudgetError(
                        f"an adapter of rank {rank} needs {rank} rank pages; a replica holds "
                        f"{self.memory.total_pages} (lora.slot_memory_bytes)"
                    )
                with self._cond:
                    entry.weights, entry.rank = weights, rank
            with self._memory_lock:
                victims = self._make_room(entry)
                if victims is None:
                    return  # BLOCKED: retried after a release
                for victim in victims:
                    self.memory.clear(victim.slot)
                    self._notify("evict", victim.key)
                with self._cond:
                    self._free_slots.extend(v.slot for v in victims)
                    slot = self._free_slots.pop()
                    entry.slot = slot
                try:
                    self.memory.load(slot, entry.weights)
                except BaseException:
                    with self._cond:
                        self._free_slots.append(slot)
                        entry.slot = 0
                    raise
        except Exception as e:  # the requests that want it get the error
            with self._cond:
                entry.state, entry.error, entry.weights = State.FAILED, e, None
                if entry.priority == _NOT_WANTED:
                    self._drop(entry)
            self._changed()
            return
        seconds = time.perf_counter() - start
        with self._cond:
            entry.state, entry.weights = State.READY, None
            self._clock += 1
            entry.last_used = self._clock
            self.loads += 1
            self.load_seconds += seconds
        self._notify("load", entry.key, seconds)
        self._changed()

    def _make_room(self, entry: _Entry) -> list[_Entry] | None:
        """Victims to evict so that ``entry`` fits (a slot and its pages), taken out of the table; or None
        (the entry is then BLOCKED). Caller holds ``_memory_lock``."""
        with self._cond:
            assert entry.rank is not None
            candidates = sorted(
                (
                    e
                    for e in self._entries.values()
                    if e.state is State.READY and not e.pins and e.priority > entry.priority
                ),
                key=lambda e: (e.priority != _NOT_WANTED, -e.priority if e.priority != _NOT_WANTED else 0, e.last_used),
            )
            free_slots, free_pages = len(self._free_slots), self.memory.free_pages
            victims = []
            for victim in candidates:
                if free_slots >= 1 and free_pages >= entry.rank:
                    break
                victims.append(victim)
                free_slots += 1
                free_pages += victim.rank or 0
            if free_slots < 1 or free_pages < entry.rank:
                entry.state, entry.blocked_at = State.BLOCKED, self._generation
                return None
            for victim in victims:
                self._drop(victim)
                self.evictions += 1
            entry.state = State.LOADING
            return victims
