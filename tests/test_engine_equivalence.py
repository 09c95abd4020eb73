"""The engine's images equal diffusers' StableDiffusionPipeline's, alone and in mixed batches."""

import pytest
import torch

from engine_helpers import Engine

CASES = [
    # prompt, negative, scheduler, steps, guidance, seed
    ("a cat", "blurry", "default", 6, 7.5, 1),
    ("a red house by the sea", "", "ddim", 5, 5.0, 2),
    ("dog", "", "euler", 4, 1.0, 3),  # guidance <= 1: one UNet row, no negative prompt
    ("a castle on a hill", "ugly", "euler_a", 7, 8.0, 4),
    ("forest in autumn", "", "dpmpp_2m", 8, 3.0, 5),
]


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny)


@pytest.mark.parametrize("prompt, negative, scheduler, steps, guidance, seed", CASES)
def test_alone_equals_pipeline(engine, prompt, negative, scheduler, steps, guidance, seed):
    ours = engine.run(
        [engine.request(prompt, negative, steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler)]
    )
    ref = engine.reference(prompt, negative, steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler)
    assert ours.shape == ref.shape == (1, 3, 64, 64)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.05  # a real picture, not a constant


def test_mixed_batch_equals_alone_and_pipeline(engine):
    requests = [engine.request(p, n, steps=k, guidance_scale=g, seed=s, scheduler=sch) for p, n, sch, k, g, s in CASES]
    alone = torch.cat([engine.run([r]) for r in requests])
    batched = engine.run(requests)
    assert engine.steps.rows_run > 0
    assert (batched - alone).abs().max().item() <= 1e-5
    for i, (p, n, sch, k, g, s) in enumerate(CASES):
        ref = engine.reference(p, n, steps=k, guidance_scale=g, seed=s, scheduler=sch)
        assert (batched[i] - ref[0]).abs().max().item() <= 1e-4


def test_batch_actually_shares_forwards(engine):
    requests = [engine.request("a cat", seed=s, steps=5, scheduler="ddim") for s in range(4)]
    before = engine.steps.ticks_run
    engine.run(requests)
    assert engine.steps.ticks_run - before == 5  # four images, five UNet forwards


def test_seed_determinism_and_image_k_uses_seed_plus_k(engine):
    a = engine.run([engine.request("a boat", seed=10 + k, steps=4) for k in range(2)])
    b = engine.run([engine.request("a boat", seed=11, steps=4)])
    c = engine.run([engine.request("a boat", seed=10, steps=4)])
    assert torch.equal(a[1], b[0])
    assert torch.equal(a[0], c[0])
    assert (a[0] - a[1]).abs().max().item() > 0.05


def test_different_sizes_run_in_separate_buckets(engine):
    small = engine.request("a cat", size=64, steps=3, seed=1)
    large = engine.request("a cat", size=128, steps=3, seed=1)
    out_small = engine.run([small])
    jobs = engine.steps.submit([engine.request("a cat", size=64, steps=3, seed=1), large])
    buckets = []
    while not engine.steps.idle:
        engine.steps.tick()
        buckets.append(tuple(sorted({j.bucket for j in engine.steps.active})))
    assert jobs[0].bucket == (8, 8, 77) and jobs[1].bucket == (16, 16, 77)
    assert engine.steps.ticks_run > 0
    from deployments.engine.images import decode

    assert torch.equal(decode(engine.vae, jobs[0].x_t, per_image=True), out_small)
