"""A tick reads nothing back from the device, and its vectorized steps equal the per-request objects.

Mixed batches on the tiny model: DDIM, Euler, Euler a and DPM++ 2M images, text-to-
image, img2img and inpainting (4-channel UNet: a blend with the init latents after
every step), with different step counts, joining at different ticks. The
``HostSyncCounter`` records every ``.item()``, ``.tolist()``, ``.cpu()``,
``bool(t)``, ``nonzero``... during each ``tick()``: none, except the one check of
the finished images' latents in a tick where some finish (``_hand_over``).
"""

from __future__ import annotations

import pytest
import torch
from test_inpaint_equivalence import conditioned_request, init_image, mask_image, style_lora  # noqa: F401

from deployments.engine import step_scheduler
from deployments.engine.host_syncs import HostSyncCounter
from deployments.engine.scheduler_steps import PerRequestStep

from engine_helpers import Engine
from lora_helpers import UNET_ATTN

VECTORIZED = ("ddim", "euler", "euler_a", "dpmpp_2m")


def scenario(engine) -> list[tuple[int, object]]:
    """(tick to submit before, request): seven text-to-image images (one without guidance), one img2img, three
    inpaintings (one at strength 1)."""
    plan = [(2 * i, engine.request(f"picture {i}", steps=4 + i, seed=i, scheduler=VECTORIZED[i % 4])) for i in range(6)]
    plan += [
        (1, engine.request("no guidance", guidance_scale=1.0, steps=5, seed=9, scheduler="dpmpp_2m")),
        (3, conditioned_request(engine, "a castle", image=init_image(1), mask=None, channels=4, scheduler="ddim",
                                steps=6, strength=0.8, seed=1)),
        (0, conditioned_request(engine, "a red door", image=init_image(2), mask=mask_image(), channels=4,
                                scheduler="euler_a", steps=7, strength=0.7, seed=2)),
        (4, conditioned_request(engine, "a blue door", image=init_image(3), mask=mask_image(8, 24, 56, 56),
                                channels=4, scheduler="dpmpp_2m", steps=5, strength=1.0, seed=3)),
        (5, conditioned_request(engine, "a window", image=init_image(4), mask=mask_image(), channels=4,
                                scheduler="euler", steps=4, strength=0.9, seed=4)),
    ]  # fmt: skip
    return plan


def drive(engine, plan, on_tick=None) -> list:
    """Submit each request before its tick, tick until idle; the jobs in plan order."""
    jobs: dict[int, object] = {}
    tick = 0
    while len(jobs) < len(plan) or not engine.steps.idle:
        for k, (at, request) in enumerate(plan):
            if at == tick and k not in jobs:
                (jobs[k],) = engine.steps.submit([request])
        if on_tick is None:
            engine.steps.tick()
        else:
            on_tick()
        tick += 1
    return [jobs[k] for k in range(len(plan))]


def count_syncs(engine, plan) -> list[tuple[int, list[str]]]:
    """Per tick: (jobs that finished, the host syncs recorded), after a warm-up run of the same plan."""
    drive(engine, plan)  # warm-up: the batch-invariant kernels check each new batch shape once
    record = []

    def counted_tick():
        with HostSyncCounter() as syncs:
            finished = engine.steps.tick()
        record.append((len(finished), syncs.calls))

    jobs = drive(engine, plan, counted_tick)
    assert all(j.error is None for j in jobs)
    return record


def assert_no_syncs_but_the_hand_over(record):
    assert len(record) >= 10
    assert any(n == 0 for n, _ in record) and any(n > 0 for n, _ in record)
    for finished, calls in record:
        assert calls == (["tolist"] if finished else []), (finished, calls)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny, max_rows_per_tick=16, max_queued=16)


def test_a_tick_has_no_host_syncs(engine):
    assert_no_syncs_but_the_hand_over(count_syncs(engine, scenario(engine)))


def test_a_tick_on_step_graph_buffers_has_no_host_syncs(tiny):
    """The UNet step through ``StepGraphs``' static buffers (eager on the CPU: no capture), padded row buckets."""
    from deployments.engine.step_graphs import StepGraphs

    engine = Engine(tiny, max_rows_per_tick=16, max_queued=16)
    engine.steps.step_graphs = StepGraphs(engine.unet, capture=False)
    assert_no_syncs_but_the_hand_over(count_syncs(engine, scenario(engine)))


def test_the_per_request_fallback_does_sync(engine):
    """The counter sees diffusers' own syncs: a PNDM image (the tiny model's default) in the batch."""
    plan = [(0, engine.request("x", steps=3, seed=1, scheduler="default")), *scenario(engine)[:2]]
    record = count_syncs(engine, plan)
    assert any(calls and calls != ["tolist"] for _, calls in record)


def test_a_tick_with_lora_rows_has_no_host_syncs(tiny, style_lora):  # noqa: F811
    """Rows with an adapter (multi-LoRA routing) among rows without."""
    from deployments.engine.multi_lora import MultiLoRAModel

    _, adapter = style_lora
    engine = Engine(tiny, max_rows_per_tick=16, max_queued=16)
    engine.steps.lora = MultiLoRAModel(engine.unet, UNET_ATTN, num_slots=2, max_rank=8, deterministic=True)
    engine.steps.lora.load(1, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("unet").items()})
    plan = scenario(engine)
    for k in (0, 3, 7, 8):
        plan[k][1].adapters = ((1, 0.8),)
    record = count_syncs(engine, plan)
    extra = [calls for finished, calls in record if calls != (["tolist"] if finished else [])]
    if extra:
        # multi_lora.py is being rewritten under #19 (static routing buffers); its routing read rows back
        # (MultiLoRAModel.rank_groups: g.rows.tolist()) when this test was written.
        pytest.xfail(f"multi-LoRA routing reads the host in {len(extra)} of {len(record)} ticks: {extra[0]}")
    assert_no_syncs_but_the_hand_over(record)


def test_vectorized_steps_equal_the_per_request_objects(engine, monkeypatch):
    """The same staggered mixed batch twice: vectorized kinds, then every job on its diffusers object."""
    plan = scenario(engine)
    jobs = drive(engine, plan)
    assert {type(j.schedule.kind).__name__ for j in jobs} == {
        "DDIMStep",
        "EulerStep",
        "EulerAncestralStep",
        "DPMSolverMultistepStep",
    }
    monkeypatch.setattr(step_scheduler, "step_for", lambda scheduler, kwargs: PerRequestStep())
    reference = drive(engine, scenario(engine))
    assert all(isinstance(j.schedule.kind, PerRequestStep) for j in reference)
    for k, (ours, ref) in enumerate(zip(jobs, reference, strict=True)):
        assert ours.index == ref.index == len(ref.timesteps)
        assert torch.equal(ours.x_t, ref.x_t), (k, plan[k][1].scheduler, (ours.x_t - ref.x_t).abs().max())
    assert ours.x_t.std() > 0.1
