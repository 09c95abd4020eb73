"""Weighted fair queuing across tenants: exact order, weights, no starvation, bounds."""

import pytest

from deployments.engine.fair_queue import FairQueue
from deployments.engine.step_scheduler import QueueFullError

from engine_helpers import Engine


def drain(q):
    out = []
    while q:
        out.append(q.pop())
    return out


def test_fifo_within_a_tenant_and_alternation_between_equal_tenants():
    q = FairQueue()
    for i in range(4):
        q.push("a", f"a{i}", cost=1)
    for i in range(2):
        q.push("b", f"b{i}", cost=1)
    assert drain(q) == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_weights_share_by_ratio():
    q = FairQueue({"gold": 4.0})
    for i in range(6):
        q.push("gold", f"g{i}", cost=1)
        q.push("free", f"f{i}", cost=1)
    # finish tags: g_i = (i + 1) / 4, f_i = i + 1; ties go to the earlier push
    assert drain(q)[:8] == ["g0", "g1", "g2", "f0", "g3", "g4", "g5", "f1"]


def test_a_newcomer_is_not_starved_by_an_old_backlog():
    q = FairQueue()
    for i in range(100):
        q.push("flood", i, cost=1)
    for _ in range(50):
        q.pop()
    q.push("late", "L", cost=1)
    assert q.pop() in (50, "L") and "L" in [q.pop(), q.pop()]


def test_cost_counts():
    q = FairQueue()
    q.push("big", "B1", cost=10)
    q.push("big", "B2", cost=10)
    for i in range(5):
        q.push("small", f"s{i}", cost=2)
    assert drain(q) == ["s0", "s1", "s2", "s3", "B1", "s4", "B2"]


def test_remove_keeps_order():
    q = FairQueue()
    for item in ("a0", "a1"):
        q.push("a", item, cost=1)
    q.push("b", "b0", cost=1)
    assert q.remove("a0") and not q.remove("zz")
    assert (len(q), q.depths()) == (2, {"a": 1, "b": 1})
    assert drain(q) == ["b0", "a1"]


@pytest.mark.parametrize("weights, default", [({"x": 0}, 1.0), ({}, -1.0)])
def test_bad_weights(weights, default):
    with pytest.raises(ValueError, match="must be > 0"):
        FairQueue(weights, default)


def test_overload_shares_completed_images_between_tenants(tiny):
    """Tenant A sends 4x as many requests as B; while both have a backlog B gets >= 45% of images."""
    engine = Engine(tiny, max_rows_per_tick=4, max_queued=64)
    steps = engine.steps
    for i in range(32):
        steps.submit([_req(engine, "A", i)])
        if i % 4 == 0:
            steps.submit([_req(engine, "B", 100 + i)])
    done = []
    while steps.waiting.depth("A") and steps.waiting.depth("B"):
        done += [j.request.tenant for j in steps.tick()]
    assert len(done) >= 6
    assert done.count("B") / len(done) >= 0.45


def test_one_tenant_flood_fills_only_its_share(tiny):
    engine = Engine(tiny, max_rows_per_tick=2, max_queued=3)
    steps = engine.steps
    steps.submit([_req(engine, "A", i) for i in range(3)])
    with pytest.raises(QueueFullError, match="3 of 3 images waiting"):
        steps.submit([_req(engine, "A", 9)])
    steps.submit([_req(engine, "B", 10)])  # B still gets in
    assert steps.waiting.depths() == {"A": 3, "B": 1}


def _req(engine, tenant, seed):
    r = engine.request("x", steps=2, seed=seed, scheduler="ddim")
    r.tenant = tenant
    return r


def test_position_is_the_pop_order_over_all_tenants():
    class Job:  # positions are by identity, as for DenoiseJobs
        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return self.name

    jobs = {name: Job(name) for name in ["g0", "g1", "g2", "f0", "f1", "f2", "l0"]}
    q = FairQueue({"gold": 4.0})
    for i in range(3):
        q.push("gold", jobs[f"g{i}"], cost=1)
        q.push("free", jobs[f"f{i}"], cost=1)

    def positions(*names):
        return [q.position(jobs[n]) for n in names]

    # finish tags: g_i = (i + 1) / 4, f_i = i + 1 -> pop order g0 g1 g2 f0 f1 f2
    assert positions("g0", "g1", "g2", "f0", "f1", "f2") == [0, 1, 2, 3, 4, 5]
    assert q.position(Job("g0")) is None  # an equal-looking item is not the waiting one
    assert q.pop() is jobs["g0"]
    assert positions("g0", "f0") == [None, 2]
    q.remove(jobs["g2"])
    assert positions("g1", "f0", "f1", "f2") == [0, 1, 2, 3]
    q.push("late", jobs["l0"], cost=1)  # a new tenant starts at the virtual time (0.25): finish 1.25
    assert positions("l0", "f1") == [2, 3]
    expected = {j: q.position(j) for j in q}
    assert drain(q) == sorted(expected, key=expected.get)
    assert [j.name for j in sorted(expected, key=expected.get)] == ["g1", "f0", "l0", "f1", "f2"]


def test_push_front_puts_a_paused_item_first_in_its_tenant_uncharged():
    """A paused job goes back first in its tenant's FIFO at the virtual time; its tenant's later items keep their
    tags (its cost was charged once, when it was first pushed), so the other tenant's order is unchanged."""
    q = FairQueue()
    for item in ("a1", "a2", "a3"):
        q.push("a", item, cost=1)
    q.push("b", "b1", cost=1)
    assert q.pop() == "a1"  # admitted (V = 1) ...
    q.push_front("a", "a1")  # ... and paused
    assert q.in_order() == ["a1", "b1", "a2", "a3"] and len(q) == 4
    assert [q.pop() for _ in range(4)] == ["a1", "b1", "a2", "a3"]
    q.push_front("c", "c1")  # a tenant with nothing waiting
    assert q.in_order() == ["c1"] and q.depth("c") == 1
