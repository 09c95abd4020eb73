"""Loading an adapter never stalls the running batch: it loads beside it; the request joins when resident."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.engine.adapters import ModelAdapters
from deployments.engine.config import LoRAConfig
from deployments.engine.loop import DenoiseLoop
from lora_registry.canonical import LoraWeights

from conftest import until
from engine_helpers import Engine


class GatedRegistry:
    """A registry whose load blocks until released: the "model" of an adapter is its name."""

    def __init__(self, unet):
        self.gate = threading.Event()
        self.loading = threading.Event()
        self.to_q = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")

    def load(self, ref):
        self.loading.set()
        assert self.gate.wait(30)
        import torch

        lin = self.to_q.base if hasattr(self.to_q, "base") else self.to_q
        path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        w = LoraWeights(A=torch.ones(2, lin.in_features), B=torch.ones(lin.out_features, 2), alpha=2.0)

        class Adapter:
            def component(self, name):
                return {path: w} if name == "unet" else {}

        return None, Adapter()


def test_load_runs_beside_the_running_batch(tiny, tick_gate):
    engine = Engine(tiny, max_rows_per_tick=8)
    registry = GatedRegistry(engine.unet)
    adapters = ModelAdapters(
        engine.unet, "unet", registry, LoRAConfig(max_loras_per_replica=2, max_rank=4), deterministic=True
    )
    engine.steps.lora = adapters.lora
    loop = DenoiseLoop(engine.steps)
    gate = tick_gate(engine.steps)  # the test lets each tick through: no race between the batch and the load

    async def main():
        running = asyncio.create_task(loop.run([engine.request("base", steps=40, seed=1, scheduler="ddim")]))
        await gate.ticks(2)
        acquiring = asyncio.create_task(adapters.acquire(["style@1"]))
        await asyncio.to_thread(registry.loading.wait, 30)
        await gate.ticks(3)  # the batch keeps stepping while the load is held
        assert engine.steps.ticks_run == 5 and not acquiring.done()
        registry.gate.set()
        (slot,) = await acquiring
        request = engine.request("styled", steps=3, seed=2, scheduler="ddim")
        request.adapters = ((slot, 1.0),)
        styled_run = asyncio.create_task(loop.run([request]))
        await until(lambda: len(engine.steps.waiting) == 1)  # submitted; it joins the batch at the next tick
        gate.allow(3)
        (styled,) = await styled_run  # joined the running batch: three ticks, one per step
        await adapters.release(["style@1"])
        assert engine.steps.ticks_run == 8 and not running.done()  # the long request is still going
        gate.open()
        (long_job,) = await running
        return slot, styled, long_job

    slot, styled, long_job = asyncio.run(main())
    assert slot == 1 and styled.done and long_job.done
    assert styled.finished_at < long_job.finished_at
    assert adapters.stats()["loads"] == 1 and adapters.stats()["slots_pinned"] == 0


def test_slot_wait_is_bounded(tiny):
    from deployments.engine.adapters import SlotWaitTimeoutError

    engine = Engine(tiny)
    registry = GatedRegistry(engine.unet)
    registry.gate.set()
    adapters = ModelAdapters(
        engine.unet,
        "unet",
        registry,
        LoRAConfig(max_loras_per_replica=1, max_rank=4, slot_wait_timeout_s=0.3),
        deterministic=True,
    )

    async def main():
        await adapters.acquire(["a@1"])  # pinned: the only slot is taken
        with pytest.raises(SlotWaitTimeoutError, match="no adapter slot"):
            await adapters.acquire(["b@1"])
        await adapters.release(["a@1"])
        return await adapters.acquire(["b@1"])  # now the LRU slot is free to reuse

    assert asyncio.run(main()) == [1]
    assert adapters.stats()["evictions"] == 1
