"""Adapter residency: loads in the background, pins at admission, memory per rank, eviction by LRU and need.

A real ``MultiLoRAModel`` (paged) over two Linear layers; each adapter's fetch can be held, so
every test reads the exact state after each step (the loader is waited on, never raced).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deployments.engine.adapter_slots import AdapterBudgetError, AdapterResidency, State
from deployments.engine.multi_lora import MultiLoRAModel

IN, OUT = 8, 6


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(IN, OUT)
        self.b = torch.nn.Linear(OUT, IN)


class Fetch:
    """Weights of adapter ``"name/rank"``; ``hold(key)`` makes its fetch wait until ``let(key)``."""

    def __init__(self):
        self.calls: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}

    def hold(self, key):
        self.gates[key] = threading.Event()

    def let(self, key):
        self.gates[key].set()

    def __call__(self, key):
        self.calls.append(key)
        if key in self.gates:
            assert self.gates[key].wait(30)
        if key in self.fail:
            raise self.fail[key]
        r = int(key.split("/")[1])
        g = torch.Generator().manual_seed(hash(key) % 1000)
        return {
            "a": (torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), float(r)),
            "b": (torch.randn(r, OUT, generator=g), torch.randn(IN, r, generator=g), float(r)),
        }


def settle(residency, keys, states=(State.READY, State.FAILED, State.BLOCKED), timeout_s=30):
    """Wait until each key's load has come to rest (the loader runs in its own thread)."""
    deadline = time.monotonic() + timeout_s
    while not all(residency.state(k) in states for k in keys):
        assert time.monotonic() < deadline, {k: residency.state(k) for k in keys}
        time.sleep(0.002)


def make(num_slots=5, pages=12, loader_threads=1, **kw):
    """One loader thread unless asked: loads then run in priority order, so slot numbers are exact."""
    model = Model()
    lora = MultiLoRAModel(model, ["a", "b"], num_slots=num_slots, max_rank=8, num_pages=pages)
    fetch = Fetch()
    changes = []
    residency = AdapterResidency(lora, fetch, on_change=lambda: changes.append(1), loader_threads=loader_threads, **kw)
    return residency, lora, fetch, changes


def test_want_loads_then_pin_hit_release():
    residency, lora, fetch, changes = make()
    assert residency.try_pin(["x/4"]) is None  # not wanted yet: nothing loads, nothing pinned
    residency.want([["x/4"]])
    settle(residency, ["x/4"])
    assert residency.resident() == {"x/4": 1} and residency.pinned() == {}  # loaded, not pinned
    assert residency.try_pin(["x/4"]) == [1]
    assert residency.try_pin(["x/4"]) == [1]
    assert residency.pinned() == {"x/4": 2}
    assert (residency.misses, residency.hits, residency.loads) == (1, 1, 1)  # first pin of a load is the miss
    residency.release(["x/4", "x/4"])
    assert residency.pinned() == {} and fetch.calls == ["x/4"] and changes == [1]
    assert lora.free_pages == 12 - 4 and residency.consistent()
    with pytest.raises(RuntimeError, match="not pinned"):
        residency.release(["x/4"])


def test_memory_is_paid_per_rank_and_lru_unpinned_goes_first():
    residency, lora, fetch, _ = make(num_slots=6, pages=12)
    residency.want([["a/4"], ["b/4"], ["c/4"]])
    settle(residency, ["a/4", "b/4", "c/4"])
    assert lora.free_pages == 0 and len(residency.resident()) == 3  # three rank-4 adapters in 12 pages
    assert residency.memory_bytes() == (12 * lora.page_bytes, 12 * lora.page_bytes)
    for key in ("a/4", "b/4", "c/4"):  # use order: a, b, c ...
        residency.release([key]) if residency.try_pin([key]) else None
    residency.release([k for k in ("a/4",) if residency.try_pin([k])])  # ... then a again: b is the LRU
    residency.want([["d/8"]])
    settle(residency, ["d/8"])
    assert set(residency.resident()) == {"a/4", "d/8"}  # rank 8 needed two rank-4 evictions: b, then c
    assert residency.evictions == 2 and residency.resident_by_rank() == {4: 1, 8: 1}
    assert lora.free_pages == 0 and residency.consistent()


def test_pinned_adapters_stay_and_a_load_waits_for_memory_then_runs_after_release():
    residency, lora, fetch, _ = make(num_slots=6, pages=8)
    residency.want([["a/4"], ["b/4"]])
    settle(residency, ["a/4", "b/4"])
    assert residency.try_pin(["a/4"]) == [1] and residency.try_pin(["b/4"]) == [2]  # both running
    residency.want([["c/4"]])
    settle(residency, ["c/4"])
    assert residency.state("c/4") is State.BLOCKED and residency.blocked(["c/4"])
    assert set(residency.resident()) == {"a/4", "b/4"} and residency.try_pin(["c/4"]) is None
    residency.release(["b/4"])  # b's request left the batch: c may take its pages
    settle(residency, ["c/4"], states=(State.READY,))
    assert set(residency.resident()) == {"a/4", "c/4"} and fetch.calls.count("c/4") == 1  # fetched once
    assert residency.consistent()


def test_a_prefetch_never_evicts_what_a_request_nearer_the_front_wants():
    residency, lora, fetch, _ = make(num_slots=6, pages=8)
    residency.want([["a/4"], ["b/4"]])
    settle(residency, ["a/4", "b/4"])
    residency.want([["a/4"], ["b/4"], ["c/4"]])  # c is for the third request: a and b are wanted first
    settle(residency, ["c/4"])
    assert residency.state("c/4") is State.BLOCKED and set(residency.resident()) == {"a/4", "b/4"}
    residency.want([["a/4"], ["c/4"]])  # b's request went elsewhere (cancelled): b is evictable for c
    settle(residency, ["c/4"], states=(State.READY,))
    assert set(residency.resident()) == {"a/4", "c/4"} and residency.prefetches >= 1
    assert residency.consistent()


def test_loads_go_in_fair_order_and_beside_each_other():
    residency, lora, fetch, _ = make(loader_threads=1)
    fetch.hold("slow/2")
    residency.want([["slow/2"]])
    deadline = time.monotonic() + 30
    while fetch.calls != ["slow/2"]:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    residency.want([["slow/2"], ["late/2"], ["next/2"]])
    fetch.let("slow/2")
    settle(residency, ["slow/2", "late/2", "next/2"])
    assert fetch.calls == ["slow/2", "late/2", "next/2"]  # one loader thread: by priority, front first


def test_a_failed_load_fails_the_requests_that_want_it_and_is_retried_later():
    residency, lora, fetch, changes = make()
    fetch.fail["bad/2"] = OSError("store unreachable")
    residency.want([["bad/2"], ["bad/2", "ok/2"]])
    settle(residency, ["bad/2", "ok/2"])
    for keys in (["bad/2"], ["ok/2", "bad/2"]):  # every request that wants it gets the error
        with pytest.raises(OSError, match="unreachable"):
            residency.try_pin(keys)
    assert residency.pinned() == {}  # ok/2 was not left pinned by the failed request
    residency.want([])  # nobody wants it any more: forgotten
    assert residency.state("bad/2") is None
    del fetch.fail["bad/2"]
    residency.want([["bad/2"]])
    settle(residency, ["bad/2"])
    assert residency.try_pin(["bad/2"]) is not None and fetch.calls.count("bad/2") == 2


def test_adapters_that_can_never_be_resident_fail_at_once():
    residency, lora, fetch, _ = make(num_slots=3, pages=6)
    with pytest.raises(AdapterBudgetError, match="at most 2"):
        residency.check(["a/2", "b/2", "c/2"])  # more adapters than slots
    residency.want([["big/8"]])
    settle(residency, ["big/8"])
    with pytest.raises(AdapterBudgetError, match="rank 8 needs 8 rank pages; a replica holds 6"):
        residency.try_pin(["big/8"])
    residency.want([["a/4", "b/4"]])
    settle(residency, ["a/4", "b/4"])
    with pytest.raises(AdapterBudgetError, match="need 8 rank pages together; a replica holds 6"):
        residency.try_pin(["a/4", "b/4"])


def test_only_if_pinned_takes_no_new_memory():
    residency, lora, fetch, _ = make()
    residency.want([["a/2"], ["b/2"]])
    settle(residency, ["a/2", "b/2"])
    assert residency.try_pin(["a/2"]) == [1]
    assert residency.try_pin(["b/2"], only_if_pinned=True) is None  # resident but not running
    assert residency.try_pin(["a/2"], only_if_pinned=True) == [1]
    assert residency.pinned() == {"a/2": 2}


def test_evict_drops_an_unpinned_adapter_only():
    residency, lora, fetch, _ = make()
    residency.want([["a/2"]])
    settle(residency, ["a/2"])
    residency.try_pin(["a/2"])
    assert not residency.evict("a/2")
    residency.release(["a/2"])
    assert residency.evict("a/2") and residency.resident() == {} and lora.free_pages == 12
    assert residency.consistent()


def test_two_loaders_fill_distinct_slots_and_pages():
    residency, lora, fetch, _ = make(num_slots=9, pages=40, loader_threads=2)
    keys = [f"k{i}/{r}" for i, r in enumerate((2, 4, 8, 2, 4, 8, 2, 4))]
    residency.want([[k] for k in keys])
    settle(residency, keys, states=(State.READY,))
    slots = residency.resident()
    assert sorted(slots.values()) == list(range(1, 9)) and lora.free_pages == 40 - 34
    assert residency.consistent()
