"""The adapter slot table: exact state after every step (fake loader: a slot's content is its key)."""

import threading

import pytest

from deployments.engine.adapter_slots import AdapterSlots, NoFreeSlotError


class FakeModel:
    def __init__(self):
        self.slots = {}
        self.load_calls = []

    def load(self, slot, key):
        self.load_calls.append(key)
        self.slots[slot] = key

    def clear(self, slot):
        self.slots.pop(slot, None)


@pytest.fixture()
def table():
    model = FakeModel()
    return AdapterSlots(3, model.load, model.clear), model  # two usable slots


def test_load_hit_pin_release(table):
    slots, model = table
    assert slots.acquire(["a"]) == [1]
    assert slots.acquire(["a"]) == [1]
    assert (slots.loads, slots.hits, model.load_calls) == (1, 1, ["a"])
    assert slots.pinned() == {"a": 2}  # pin count
    slots.release(["a"])
    assert slots.pinned() == {"a": 1}
    slots.release(["a"])
    assert slots.pinned() == {}
    assert slots.resident() == {"a": 1}  # key -> slot


def test_lru_eviction_among_unpinned_only(table):
    slots, model = table
    slots.acquire(["a"])
    slots.acquire(["b"])
    slots.release(["b"])
    slots.acquire(["c"])  # "a" is pinned, so "b" goes
    assert slots.resident() == {"a": 1, "c": 2}
    assert slots.evictions == 1 and model.slots == {1: "a", 2: "c"}
    with pytest.raises(NoFreeSlotError, match="pinned"):
        slots.acquire(["d"])
    assert slots.resident() == {"a": 1, "c": 2}


def test_acquire_is_all_or_nothing(table):
    slots, _ = table
    slots.acquire(["a"])
    with pytest.raises(NoFreeSlotError):
        slots.acquire(["b", "c"])  # b fits, c does not: b must not stay pinned
    assert slots.pinned() == {"a": 1}


def test_failed_load_frees_its_slot():
    def load(slot, key):
        raise OSError("registry unreachable")

    slots = AdapterSlots(2, load, lambda s: None)
    with pytest.raises(OSError):
        slots.acquire(["a"])
    assert slots.resident() == {} and slots.pinned() == {} and slots.capacity == 1


def test_concurrent_acquires_load_once():
    started, release = threading.Event(), threading.Event()
    calls = []

    def load(slot, key):
        calls.append(key)
        started.set()
        release.wait()

    slots = AdapterSlots(3, load, lambda s: None)
    results = []
    threads = [threading.Thread(target=lambda: results.append(slots.acquire(["a"]))) for _ in range(3)]
    threads[0].start()
    started.wait()
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert calls == ["a"] and results == [[1], [1], [1]]
    assert slots.pinned() == {"a": 3}


def test_evict_refuses_pinned(table):
    slots, model = table
    slots.acquire(["a"])
    assert not slots.evict("a")
    slots.release(["a"])
    assert slots.evict("a") and slots.resident() == {} and model.slots == {}
