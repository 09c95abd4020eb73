"""Adapters are taken at admission: a waiting request holds no slot, loads run beside the running batch,
the loop sleeps while every waiting request waits for a load, and a cancel at any await leaves no pin."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from deployments.engine.adapter_slots import State
from deployments.engine.adapters import ModelAdapters, SlotWaitTimeoutError
from deployments.engine.config import LoRAConfig
from deployments.engine.loop import DenoiseLoop
from lora_registry.canonical import LoraWeights

from conftest import until
from engine_helpers import Engine

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


class GatedRegistry:
    """A registry whose ``load(ref)`` can be held per ref; every adapter is rank 2 on one ``to_q``."""

    def __init__(self, unet):
        layer = unet.get_submodule(TO_Q)
        self.lin = layer.base if hasattr(layer, "base") else layer
        self.gates: dict[str, threading.Event] = {}
        self.loading: dict[str, threading.Event] = {}
        self.calls: list[str] = []

    def hold(self, ref):
        self.gates[ref] = threading.Event()
        self.loading[ref] = threading.Event()

    def let(self, ref):
        self.gates[ref].set()

    def load(self, ref):
        self.calls.append(ref)
        if ref in self.gates:
            self.loading[ref].set()
            assert self.gates[ref].wait(30)
        w = LoraWeights(A=torch.ones(2, self.lin.in_features), B=torch.ones(self.lin.out_features, 2), alpha=2.0)

        class Adapter:
            def component(self, name):
                return {TO_Q: w} if name == "unet" else {}

        return None, Adapter()


def denoiser(tiny, **lora):
    """The Denoiser's engine as ``deployments/denoiser.py`` wires it: residency, scheduler, loop."""
    engine = Engine(tiny, max_rows_per_tick=8)
    registry = GatedRegistry(engine.unet)
    config = LoRAConfig(**{"max_loras_per_replica": 2, "max_rank": 4, **lora})
    adapters = ModelAdapters(engine.unet, "unet", registry, config, deterministic=True)
    engine.steps.lora, engine.steps.residency = adapters.lora, adapters.residency
    loop = DenoiseLoop(engine.steps)
    adapters.on_change = loop.wake_threadsafe
    return engine, registry, adapters, loop


def styled(engine, ref, steps=3, seed=2):
    request = engine.request("styled", steps=steps, seed=seed, scheduler="ddim")
    request.adapters = ((ref, 1.0),)
    return request


def test_a_waiting_request_holds_no_slot_and_its_load_runs_beside_the_batch(tiny, tick_gate):
    engine, registry, adapters, loop = denoiser(tiny)
    residency = adapters.residency
    gate = tick_gate(engine.steps)
    registry.hold("style@1")

    async def main():
        running = asyncio.create_task(loop.run([engine.request("base", steps=40, seed=1, scheduler="ddim")]))
        await gate.ticks(2)
        styled_run = asyncio.create_task(loop.run([styled(engine, "style@1")]))
        await until(lambda: len(engine.steps.waiting) == 1)
        await gate.ticks(1)  # the admission pass wants its adapter: the load starts
        await asyncio.to_thread(registry.loading["style@1"].wait, 30)
        await gate.ticks(3)  # the batch keeps stepping while the load is held
        assert engine.steps.ticks_run == 6 and len(engine.steps.waiting) == 1  # still waiting, in the queue
        assert residency.pinned() == {}  # holds nothing while it waits
        assert engine.steps.progress(engine.steps.waiting.in_order())["position"] == 0
        registry.let("style@1")
        await until(lambda: residency.state("style@1") is State.READY)
        await gate.ticks(1)  # admitted at the next tick, stepped in it with the long request
        assert len(engine.steps.active) == 2 and residency.pinned() == {"style@1": 1}
        gate.allow(2)
        (job,) = await styled_run
        assert residency.pinned() == {} and not running.done()  # unpinned when it left the batch
        gate.open()
        (long_job,) = await running
        return job, long_job

    job, long_job = asyncio.run(main())
    assert job.done and long_job.done and job.finished_at < long_job.finished_at
    assert job.started_at > job.enqueued_at  # queue_ms includes the adapter wait
    assert job.slots == ((1, 1.0),) and adapters.stats()["loads"] == 1 and residency.consistent()


def test_the_loop_sleeps_while_every_waiting_request_waits_for_a_load(tiny, tick_gate):
    engine, registry, adapters, loop = denoiser(tiny)
    gate = tick_gate(engine.steps)
    registry.hold("style@1")
    gate.allow(5)  # a loop that spun while the load is held would use every permit

    async def main():
        run = asyncio.create_task(loop.run([styled(engine, "style@1", steps=3)]))
        await until(lambda: loop.sleeping)
        assert gate.ran == 1  # one admission pass, then asleep until the load is done
        registry.let("style@1")
        (job,) = await run
        return job

    job = asyncio.run(main())
    assert job.done and gate.ran == 4  # the pass that started the load, then three steps


def test_an_adapter_that_never_fits_fails_at_submit_and_a_failed_load_fails_its_request(tiny):
    from deployments.engine.adapter_slots import AdapterBudgetError

    engine, registry, adapters, loop = denoiser(tiny, max_loras_per_replica=1)

    async def main():
        request = styled(engine, "a@1")
        request.adapters = (("a@1", 1.0), ("b@1", 1.0))
        with pytest.raises(AdapterBudgetError, match="2 adapters in one request; a replica holds at most 1"):
            await loop.run([request])
        registry.load = lambda ref: (_ for _ in ()).throw(OSError(f"{ref}: store unreachable"))
        with pytest.raises(OSError, match="a@1: store unreachable"):
            await loop.run([styled(engine, "a@1"), styled(engine, "a@1", seed=3)])

    asyncio.run(main())
    assert engine.steps.idle and adapters.residency.pinned() == {} and adapters.residency.consistent()


# -- cancellation at every await of submit -> admit -> run -> release ----------------------------


@pytest.mark.parametrize("point", ["queued", "loading", "resident", "running", "last-step"])
def test_cancel_at_every_await_leaves_no_pin(tiny, tick_gate, point):
    engine, registry, adapters, loop = denoiser(tiny)
    residency = adapters.residency
    gate = tick_gate(engine.steps)
    registry.hold("style@1")

    async def main():
        run = asyncio.create_task(loop.run([styled(engine, "style@1", steps=3)]))
        await until(lambda: len(engine.steps.waiting) == 1)
        if point != "queued":  # the admission pass starts the load
            await gate.ticks(1)
            await asyncio.to_thread(registry.loading["style@1"].wait, 30)
        if point in ("resident", "running", "last-step"):
            registry.let("style@1")
            await until(lambda: residency.state("style@1") is State.READY)
        if point == "running":
            await gate.ticks(1)  # admitted and pinned, one step done
            assert residency.pinned() == {"style@1": 1}
        if point == "last-step":
            await gate.ticks(2)  # two of three steps done
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        registry.let("style@1")
        gate.open()  # a running job leaves the batch at the next tick
        await until(lambda: engine.steps.idle and not engine.steps.active)
        await until(lambda: residency.state("style@1") in (State.READY, None))

    asyncio.run(main())
    assert residency.pinned() == {} and residency.consistent()
    assert loop.cancelled_jobs == 1


@pytest.mark.parametrize("point", ["loading", "resident"])
def test_text_encoder_acquire_cancelled_while_waiting_leaves_no_pin(tiny, point):
    engine, registry, adapters, loop = denoiser(tiny)
    residency = adapters.residency
    registry.hold("style@1")

    async def main():
        acquiring = asyncio.create_task(adapters.acquire(["style@1"]))
        await asyncio.to_thread(registry.loading["style@1"].wait, 30)
        if point == "resident":  # the load finished; the waiter has not resumed yet (the loop is held)
            registry.let("style@1")
            until_sync(lambda: residency.state("style@1") is State.READY)
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
        registry.let("style@1")
        await until(lambda: residency.state("style@1") is State.READY)
        return len(adapters._waiters)

    assert asyncio.run(main()) == 0
    assert residency.pinned() == {} and residency.consistent()


def until_sync(condition, timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_text_encoder_wait_is_bounded_and_then_evicts(tiny):
    engine, registry, adapters, loop = denoiser(tiny, max_loras_per_replica=1, slot_wait_timeout_s=0.3)

    async def main():
        await adapters.acquire(["a@1"])  # pinned: the only slot is taken
        with pytest.raises(SlotWaitTimeoutError, match="no adapter slot"):
            await adapters.acquire(["b@1"])
        adapters.release(["a@1"])
        return await adapters.acquire(["b@1"])  # now the LRU slot is free to reuse

    assert asyncio.run(main()) == [1]
    assert adapters.stats()["evictions"] == 1 and adapters.residency.pinned() == {"b@1": 1}


def test_an_adapter_that_blows_up_the_latents_fails_its_request_by_name(tiny):
    from deployments.engine.step_scheduler import NonFiniteLatentsError

    engine, registry, adapters, loop = denoiser(tiny)
    load = registry.load

    def huge(ref):
        manifest, adapter = load(ref)
        (w,) = adapter.component("unet").values()
        w.A.fill_(float("inf"))  # registration refuses this; the guard is the net behind it (fp16 overflow)
        return manifest, adapter

    registry.load = huge

    async def main():
        with pytest.raises(NonFiniteLatentsError) as e:
            await loop.run([styled(engine, "huge@3", steps=2)])
        (base,) = await loop.run([engine.request("base", steps=2, seed=1, scheduler="ddim")])
        return e.value, base

    error, base = asyncio.run(main())
    assert error.message == (
        "the image became NaN/infinite during its 2 steps with adapters huge@3; "
        "lower their scale or check their weights"
    )
    assert torch.isfinite(base.x_t).all() and adapters.residency.pinned() == {}


@pytest.mark.parametrize(
    ("weights", "order"),
    [
        (None, ["h1@1", "l1@1", "h2@1", "h3@1"]),  # equal weights: the light tenant's load right after h1
        ({"heavy": 2.0}, ["h1@1", "h2@1", "l1@1", "h3@1"]),  # heavy's weight 2: two of its loads per light one
    ],
)
def test_text_encoder_slot_waits_load_in_weighted_fair_order(tiny, weights, order):
    """The TextEncoder's slot waiters (``acquire``) ask the residency for their adapters in weighted-fair order by
    tenant, not in arrival order: a heavy tenant's three rare adapters do not all load before a light tenant's
    one (FIFO would want h1, h2, h3, l1)."""
    engine = Engine(tiny, max_rows_per_tick=8)
    config = LoRAConfig(max_loras_per_replica=2, max_rank=4)
    adapters = ModelAdapters(
        engine.unet, "unet", GatedRegistry(engine.unet), config, deterministic=True, tenant_weights=weights
    )
    wanted: list[list[str]] = []
    adapters.residency.want = lambda sets: wanted.append([ref for refs in sets for ref in refs])
    adapters.residency.try_pin = lambda refs, **kw: None  # nothing becomes resident: every caller waits

    async def main():
        tasks = []
        for tenant, ref in [("heavy", "h1@1"), ("heavy", "h2@1"), ("heavy", "h3@1"), ("light", "l1@1")]:
            tasks.append(asyncio.create_task(adapters.acquire([ref], tenant)))
            await until(lambda n=len(tasks): len(adapters._waiters) == n)
        seen = list(wanted[-1])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == order
    assert len(adapters._waiters) == 0 and wanted[-1] == []
