"""FairBatcher: the TextEncoder's and the VAE's batches formed in weighted-fair order.

A fake batch function records each batch and holds it until the test releases it; the batch wait's
timer is a fake the test fires. No sleeps, no wall clock: each test drives the loop step by step.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from deployments.engine.fair_batcher import FairBatcher


class Stage:
    """A batch function that records its batches; each runs only once the test ``release``s it."""

    def __init__(self, hold: bool = True, fail: dict | None = None):
        self.batches: list[list[str]] = []
        self.hold = hold
        self.gates: list[asyncio.Event] = []
        self.fail = fail or {}  # item -> the exception returned in its place

    async def __call__(self, items: list[str]) -> list:
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.hold:
            await gate.wait()
        return [self.fail.get(x, x.upper()) for x in items]

    def release(self) -> None:
        for gate in self.gates:
            gate.set()


class Timer:
    """The batch wait: ``sleep(timeout)`` returns when the test fires it."""

    def __init__(self):
        self.pending: list[asyncio.Future] = []
        self.asked: list[float] = []

    def sleep(self, timeout_s: float):
        self.asked.append(timeout_s)
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        return fut

    def fire(self) -> None:
        for fut in self.pending:
            if not fut.done():
                fut.set_result(None)


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until it waits on something the test controls (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def submit(batcher: FairBatcher, tenant: str, item: str, cost: float = 1.0) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(batcher.submit(tenant, item, cost))


def test_a_light_tenant_is_in_the_next_batch_ahead_of_a_heavy_backlog():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=4, batch_wait_timeout_s=0)
        first = submit(batcher, "heavy", "h0")
        await settle()
        assert stage.batches == [["h0"]]  # running, held
        heavy = [submit(batcher, "heavy", f"h{i}") for i in range(1, 9)]
        await settle()
        light = submit(batcher, "light", "l0")  # arrives after the heavy backlog
        await settle()
        assert batcher.depths() == {"heavy": 8, "light": 1}
        stage.hold = False
        stage.release()
        results = await asyncio.gather(first, *heavy, light)
        # FIFO (@serve.batch) would run l0 in the fourth batch, behind all eight.
        assert stage.batches == [["h0"], ["h1", "l0", "h2", "h3"], ["h4", "h5", "h6", "h7"], ["h8"]]
        assert results == [f"H{i}" for i in range(9)] + ["L0"]

    asyncio.run(main())


def test_weights_2_to_1_share_batches_2_to_1():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=3, batch_wait_timeout_s=0, tenant_weights={"gold": 2.0})
        blocker = submit(batcher, "other", "x")
        await settle()
        tasks = [submit(batcher, "gold", f"g{i}") for i in range(60)]
        tasks += [submit(batcher, "free", f"f{i}") for i in range(60)]
        await settle()
        stage.hold = False
        stage.release()
        await asyncio.gather(blocker, *tasks)
        # While both are backlogged (the first 20 batches of 3), gold gets 2 of each 3 slots.
        backlogged = [x for batch in stage.batches[1:21] for x in batch]
        shares = Counter(x[0] for x in backlogged)
        assert shares == {"g": 40, "f": 20}
        assert all(Counter(x[0] for x in batch) == {"g": 2, "f": 1} for batch in stage.batches[1:21])
        # FIFO within a tenant
        assert [x for b in stage.batches for x in b if x[0] == "g"] == [f"g{i}" for i in range(60)]

    asyncio.run(main())


def test_a_single_tenant_gets_fifo_batches_as_serve_batch_would():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=4, batch_wait_timeout_s=0)
        tasks = [submit(batcher, "anonymous", f"r{i}") for i in range(10)]
        await settle()
        stage.hold = False
        stage.release()
        assert await asyncio.gather(*tasks) == [f"R{i}" for i in range(10)]
        # Full batches in arrival order, the rest last.
        assert stage.batches == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]

    asyncio.run(main())


def test_a_batch_waits_for_mates_until_full_or_the_timeout():
    async def main():
        stage, timer = Stage(hold=False), Timer()
        batcher = FairBatcher(stage, max_batch_size=3, batch_wait_timeout_s=0.002, sleep=timer.sleep)
        a = submit(batcher, "t1", "a")
        await settle()
        assert stage.batches == [] and timer.asked == [0.002]  # waiting for batch-mates
        b = submit(batcher, "t2", "b")
        await settle()
        assert stage.batches == []  # 2 of 3: still waiting
        timer.fire()
        await settle()
        assert stage.batches == [["a", "b"]]  # the timeout: whoever is waiting
        assert await asyncio.gather(a, b) == ["A", "B"]
        # Full before the timeout: no wait for the timer.
        tasks = [submit(batcher, "t1", x) for x in ("c", "d", "e")]
        await settle()
        assert stage.batches[-1] == ["c", "d", "e"]
        assert await asyncio.gather(*tasks) == ["C", "D", "E"]

    asyncio.run(main())


def test_batches_fill_from_whoever_is_waiting():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=4, batch_wait_timeout_s=0, tenant_weights={"a": 8.0})
        blocker = submit(batcher, "b", "x")
        await settle()
        # Tenant a has a large weight, but b's items still fill the slots a cannot.
        tasks = [submit(batcher, "a", "a0"), *(submit(batcher, "b", f"b{i}") for i in range(5))]
        await settle()
        stage.hold = False
        stage.release()
        await asyncio.gather(blocker, *tasks)
        assert stage.batches == [["x"], ["a0", "b0", "b1", "b2"], ["b3", "b4"]]

    asyncio.run(main())


def test_a_cancelled_caller_leaves_the_queue():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=2, batch_wait_timeout_s=0)
        first = submit(batcher, "t", "a")
        await settle()
        gone = submit(batcher, "t", "b")
        stays = submit(batcher, "u", "c")
        await settle()
        gone.cancel()
        await settle()
        assert gone.cancelled()
        assert batcher.depths() == {"u": 1}
        stage.hold = False
        stage.release()
        assert await asyncio.gather(first, stays) == ["A", "C"]
        assert stage.batches == [["a"], ["c"]]

    asyncio.run(main())


def test_a_caller_gone_while_its_batch_runs_does_not_disturb_the_others():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=2, batch_wait_timeout_s=0)
        blocker = submit(batcher, "t", "x")
        await settle()
        a, b = submit(batcher, "t", "a"), submit(batcher, "u", "b")
        await settle()
        stage.release()  # x finishes; [a, b] starts and is held
        await settle()
        assert stage.batches == [["x"], ["a", "b"]]
        a.cancel()
        await settle()
        stage.release()
        assert await b == "B" and await blocker == "X"
        assert a.cancelled()
        # The loop goes on.
        stage.hold = False
        assert await batcher.submit("t", "c") == "C"

    asyncio.run(main())


def test_errors_reach_their_own_callers():
    async def main():
        stage = Stage(fail={"bad": ValueError("bad prompt")})
        batcher = FairBatcher(stage, max_batch_size=3, batch_wait_timeout_s=0)
        blocker = submit(batcher, "t", "x")
        await settle()
        tasks = [submit(batcher, "t", "ok"), submit(batcher, "u", "bad"), submit(batcher, "v", "fine")]
        await settle()
        stage.hold = False
        stage.release()
        outcomes = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        assert stage.batches == [["x"], ["ok", "bad", "fine"]]
        assert outcomes[0] == "X" and outcomes[1] == "OK" and outcomes[3] == "FINE"
        assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad prompt"

    asyncio.run(main())


def test_a_raising_batch_fails_its_callers_only():
    async def main():
        calls = []

        async def batch_fn(items):
            calls.append(list(items))
            if "boom" in items:
                raise RuntimeError("out of memory")
            return [x.upper() for x in items]

        batcher = FairBatcher(batch_fn, max_batch_size=2, batch_wait_timeout_s=0)
        outcomes = await asyncio.gather(
            batcher.submit("t", "boom"), batcher.submit("u", "mate"), return_exceptions=True
        )
        assert calls == [["boom", "mate"]]
        assert all(isinstance(o, RuntimeError) and str(o) == "out of memory" for o in outcomes)
        assert await batcher.submit("t", "next") == "NEXT"  # later batches run

    asyncio.run(main())


def test_a_batch_function_returning_the_wrong_count_fails_the_batch():
    async def main():
        async def batch_fn(items):
            return items[:1]

        batcher = FairBatcher(batch_fn, max_batch_size=2, batch_wait_timeout_s=0)
        outcomes = await asyncio.gather(batcher.submit("t", "a"), batcher.submit("t", "b"), return_exceptions=True)
        assert [str(o) for o in outcomes] == ["batch function returned 1 results for 2 items"] * 2

    asyncio.run(main())


def test_cost_counts_a_tenants_work():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=1, batch_wait_timeout_s=0)
        blocker = submit(batcher, "z", "x")
        await settle()
        # big's requests have 4 images each: small's 1-image requests get 4 turns per big one.
        tasks = [submit(batcher, "big", f"b{i}", cost=4) for i in range(2)]
        tasks += [submit(batcher, "small", f"s{i}", cost=1) for i in range(8)]
        await settle()
        stage.hold = False
        stage.release()
        await asyncio.gather(blocker, *tasks)
        order = [b[0] for b in stage.batches[1:]]
        assert order == ["s0", "s1", "s2", "b0", "s3", "s4", "s5", "s6", "b1", "s7"]

    asyncio.run(main())


def test_bad_settings_name_the_field():
    async def fn(items):
        return items

    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        FairBatcher(fn, max_batch_size=0, batch_wait_timeout_s=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s must be >= 0"):
        FairBatcher(fn, max_batch_size=1, batch_wait_timeout_s=-1)
    with pytest.raises(ValueError, match="tenant weight must be > 0"):
        FairBatcher(fn, max_batch_size=1, batch_wait_timeout_s=0, tenant_weights={"a": 0})


def test_every_stage_call_carries_the_plans_tenant():
    from conftest import make_plan

    plan = make_plan(tenant="key:ann", tenant_weight=3.0)
    for params in (plan.encode_request(), plan.denoise_params(), plan.decode_params()):
        assert (params.tenant, params.tenant_weight) == ("key:ann", 3.0)


def test_batches_do_not_run_in_the_first_callers_context():
    import contextvars

    request_id = contextvars.ContextVar("request_id", default=None)

    async def main():
        seen = []

        async def batch_fn(items):
            seen.append(request_id.get())
            return items

        batcher = FairBatcher(batch_fn, max_batch_size=1, batch_wait_timeout_s=0)

        async def caller(rid: str, item: str):
            request_id.set(rid)
            return await batcher.submit("t", item)

        assert await asyncio.gather(caller("req-1", "a"), caller("req-2", "b")) == ["a", "b"]
        assert seen == [None, None]

    asyncio.run(main())


def test_a_tenant_keys_weight_sent_with_the_item_applies_from_then_on():
    async def main():
        stage = Stage()
        batcher = FairBatcher(stage, max_batch_size=3, batch_wait_timeout_s=0, tenant_weights={"gold": 1.0})
        blocker = submit(batcher, "other", "x")
        await settle()
        # The server sends a key's weight (its record's; an admin may change it): 2 for gold, as configured 2:1.
        tasks = [asyncio.create_task(batcher.submit("gold", f"g{i}", weight=2.0)) for i in range(6)]
        tasks += [submit(batcher, "free", f"f{i}") for i in range(3)]
        await settle()
        stage.hold = False
        stage.release()
        await asyncio.gather(blocker, *tasks)
        assert stage.batches[1:] == [["g0", "g1", "f0"], ["g2", "g3", "f1"], ["g4", "g5", "f2"]]
        with pytest.raises(ValueError, match="tenant weight must be > 0, got 0"):
            await batcher.submit("gold", "g", weight=0)

    asyncio.run(main())
