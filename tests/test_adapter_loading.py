"""Loading an adapter never stalls the running batch: it loads beside it; the request joins when resident."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.engine.adapters import ModelAdapters
from deployments.engine.config import LoRAConfig
from deployments.engine.loop import DenoiseLoop
from lora_registry.canonical import LoraWeights

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


def test_load_runs_beside_the_running_batch(tiny):
    engine = Engine(tiny, max_rows_per_tick=8)
    registry = GatedRegistry(engine.unet)
    adapters = ModelAdapters(
        engine.unet, "unet", registry, LoRAConfig(max_loras_per_replica=2, max_rank=4), deterministic=True
    )
    engine.steps.lora = adapters.lora
    loop = DenoiseLoop(engine.steps)

    async def main():
        running = asyncio.create_task(loop.run([engine.request("base", steps=40, seed=1, scheduler="ddim")]))
        while engine.steps.ticks_run < 2:
            await asyncio.sleep(0.01)
        acquiring = asyncio.create_task(adapters.acquire(["style@1"]))
        await asyncio.to_thread(registry.loading.wait, 30)
        ticks_at_load_start = engine.steps.ticks_run
        while engine.steps.ticks_run < ticks_at_load_start + 3:  # the batch keeps stepping during the load
            await asyncio.sleep(0.01)
        assert not acquiring.done()
        registry.gate.set()
        (slot,) = await acquiring
        request = engine.request("styled", steps=3, seed=2, scheduler="ddim")
        request.adapters = ((slot, 1.0),)
        (styled,) = await loop.run([request])  # joins the running batch
        await adapters.release(["style@1"])
        assert not running.done()  # the long request is still going: the short one finished first
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
