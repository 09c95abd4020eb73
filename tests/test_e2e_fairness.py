"""Fair batching through Ray Serve: the real TextEncoder (tiny-sd, on the session's cluster) serves a light
tenant's request ahead of a heavy tenant's backlog, in the next batch.

The TextEncoder is lorafleet's own class, deployed as its own small app with a gate in front of each batch
(``GatedTextEncoder``): the first heavy request's batch is held while the heavy backlog and then the light
request queue up (the test sees them in the replica's ``waiting_by_tenant``), then the gate opens. The
order of the batches is the replica's own record, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import wait_until

pytestmark = pytest.mark.e2e
APP = "fair-text-encoder"


@pytest.fixture(scope="module")
def gated(cluster, cache_dir):
    from ray import serve

    from deployments.config import TextEncoderConfig
    from deployments.engine.config import LoRAConfig, ModelConfig
    from deployments.text_encoder import TextEncoder
    from lora_registry.config import RegistryConfig

    class GatedTextEncoder(TextEncoder.func_or_class):
        """The TextEncoder; its batches run once the test opens the gate, and it records their prompts."""

        def __init__(self, *args):
            super().__init__(*args)
            self.opened = asyncio.Event()
            self.order: list[list[str]] = []

        async def _encode_items(self, items):
            self.order.append([item[0] for item in items])
            await self.opened.wait()
            return await super()._encode_items(items)

        def open(self) -> None:
            self.opened.set()

        def batches(self) -> list[list[str]]:
            return self.order

    registry = RegistryConfig(
        uri="s3://lorafleet-e2e/adapters",
        s3_endpoint_url=cluster.s3["endpoint_url"],
        s3_region=cluster.s3["region_name"],
    )
    app = (
        serve.deployment(GatedTextEncoder)
        .options(name="GatedTextEncoder", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
        .bind(
            ModelConfig(uri="builtin:tiny-sd", cache_dir=str(cache_dir)),
            # Batches of 2 and no wait: the order of the batches shows the queue's order. No cache: every
            # request is encoded in its batch.
            TextEncoderConfig(max_batch_size=2, batch_wait_timeout_s=0, cache_size=0),
            LoRAConfig(),
            registry,
            {"heavy": 1.0},  # the fair-share weights, as build_app passes denoiser.tenant_weights
        )
    )
    handle = serve.run(app, name=APP, route_prefix=None)
    yield handle
    serve.delete(APP)


def test_a_light_tenants_prompt_is_encoded_ahead_of_a_heavy_backlog(gated):
    from deployments.messages import EncodeRequest

    def request(prompt: str, tenant: str) -> EncodeRequest:
        return EncodeRequest(prompt, "", tenant=tenant)

    def waiting() -> dict:
        return gated.stats.remote().result(timeout_s=30)["waiting_by_tenant"]

    first = gated.encode.remote(request("heavy 0", "heavy"))
    wait_until(lambda: gated.batches.remote().result(timeout_s=30) == [["heavy 0"]], "the first batch to start")
    backlog = []
    for i in range(1, 9):  # one at a time: their order in the heavy tenant's FIFO is known
        backlog.append(gated.encode.remote(request(f"heavy {i}", "heavy")))
        wait_until(lambda i=i: waiting() == {"heavy": i}, f"heavy {i} to queue")
    light = gated.encode.remote(request("a light tenant's prompt", "light"))
    wait_until(lambda: waiting() == {"heavy": 8, "light": 1}, "the light request to queue")
    gated.open.remote().result(timeout_s=30)

    results = [r.result(timeout_s=120) for r in (first, *backlog, light)]
    batches = gated.batches.remote().result(timeout_s=30)
    # @serve.batch (FIFO) would have encoded it in the fifth batch, after all eight heavy prompts.
    assert batches == [
        ["heavy 0"],
        ["heavy 1", "a light tenant's prompt"],
        ["heavy 2", "heavy 3"],
        ["heavy 4", "heavy 5"],
        ["heavy 6", "heavy 7"],
        ["heavy 8"],
    ]
    # Encoded exactly as alone (a batch of one, no cache).
    alone = gated.encode.remote(request("a light tenant's prompt", "light")).result(timeout_s=120)
    assert torch.equal(results[-1].prompt_embeds, alone.prompt_embeds)
    assert torch.equal(results[-1].negative_prompt_embeds, alone.negative_prompt_embeds)
    assert not torch.equal(results[0].prompt_embeds, alone.prompt_embeds)
    assert gated.stats.remote().result(timeout_s=30)["waiting_by_tenant"] == {}
