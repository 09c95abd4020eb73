"""SDXL: the engine's latents equal diffusers' StableDiffusionXLPipeline's, alone and in mixed batches."""

import pytest
import torch

from deployments.messages import MicroConditioning

from engine_helpers import SDXLEngine

CASES = [
    # prompt, negative, scheduler, steps, guidance, seed, micro
    ("a cat", "blurry", "default", 5, 6.0, 1, None),
    ("a red house by the sea", "", "default", 4, 5.0, 2, None),  # empty negative: zeros (force_zeros_for_empty_prompt)
    ("dog", "", "ddim", 4, 1.0, 3, None),  # guidance <= 1: one UNet row
    ("a castle on a hill", "ugly", "euler_a", 5, 7.0, 4, MicroConditioning(original_size=(512, 384))),
    (
        "forest in autumn",
        "",
        "dpmpp_2m",
        6,
        4.0,
        5,
        MicroConditioning(
            crops_coords_top_left=(16, 8),
            target_size=(96, 64),
            negative_original_size=(32, 32),
            negative_target_size=(64, 64),
        ),
    ),
]


@pytest.fixture(scope="module")
def engine(tiny_sdxl):
    return SDXLEngine(tiny_sdxl)


def _run(engine, case):
    p, n, sch, k, g, s, micro = case
    return engine.request(p, n, steps=k, guidance_scale=g, seed=s, scheduler=sch, micro=micro)


_REFERENCES: dict[int, torch.Tensor] = {}  # diffusers' latents per case, computed once per session


def _ref(engine, case):
    key = CASES.index(case)
    if key not in _REFERENCES:
        p, n, sch, k, g, s, micro = case
        _REFERENCES[key] = engine.reference_latents(p, n, steps=k, guidance_scale=g, seed=s, scheduler=sch, micro=micro)
    return _REFERENCES[key]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_alone_equals_pipeline(engine, case):
    ours = engine.run_latents([_run(engine, case)])
    ref = _ref(engine, case)
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.05


def test_mixed_batch_equals_alone_and_pipeline(engine):
    requests = [_run(engine, c) for c in CASES]
    before = engine.steps.ticks_run
    batched = engine.run_latents(requests)
    assert engine.steps.ticks_run - before == max(c[3] for c in CASES)  # one shared forward per step
    for i, case in enumerate(CASES):
        assert (batched[i] - _ref(engine, case)[0]).abs().max().item() <= 1e-4


def test_micro_conditioning_changes_the_image(engine):
    plain = engine.run_latents([engine.request("a cat", seed=7, steps=3)])
    cropped = engine.run_latents(
        [engine.request("a cat", seed=7, steps=3, micro=MicroConditioning(crops_coords_top_left=(64, 0)))]
    )
    assert (plain - cropped).abs().max().item() > 1e-3


def test_non_square_beside_another_size_equals_pipeline(engine):
    jobs = engine.steps.submit(
        [engine.request("a boat", size=96, height=64, seed=3, steps=3), engine.request("a boat", seed=3, steps=3)]
    )
    while not engine.steps.idle:
        engine.steps.tick()
    assert jobs[0].bucket != jobs[1].bucket and jobs[0].x_t.shape == (1, 4, 8, 12)
    ref = engine.reference_latents("a boat", size=96, height=64, seed=3, steps=3)
    assert (jobs[0].x_t - ref).abs().max().item() <= 1e-4


def test_empty_negative_is_zeros_and_given_negative_is_encoded(engine):
    (zero, given) = engine.prompts.encode_prompt_pairs(["a cat", "a cat"], ["", "blurry"])
    assert torch.count_nonzero(zero.negative_prompt_embeds) == 0
    assert torch.count_nonzero(zero.negative_pooled_prompt_embeds) == 0
    assert torch.count_nonzero(given.negative_prompt_embeds) > 0
    assert zero.prompt_embeds.shape == (77, 64 + 96) and zero.pooled_prompt_embeds.shape == (96,)


def test_long_prompts_chunk_on_both_encoders(engine):
    long = " ".join(["a very detailed painting of a cat"] * 15)  # > 75 tokens
    (e,) = engine.prompts.encode_prompt_pairs([long], ["ugly"])
    assert e.prompt_embeds.shape == e.negative_prompt_embeds.shape == (154, 160)
    (short,) = engine.prompts.encode_prompt_pairs(["a very detailed painting of a cat"], ["ugly"])
    ours = engine.run_latents([engine.request(long, "ugly", seed=1, steps=2)])
    assert torch.isfinite(ours).all()
    assert not torch.equal(e.prompt_embeds[:77], short.prompt_embeds)  # the first chunk holds other words


def test_weighting_applies_per_encoder(engine):
    (plain, weighted) = engine.prompts.encode_prompt_pairs(["a cat", "a (cat:1.5)"], ["", ""])
    assert not torch.equal(plain.prompt_embeds, weighted.prompt_embeds)
    assert torch.equal(plain.pooled_prompt_embeds, weighted.pooled_prompt_embeds)  # pooled is unweighted (A1111)


def test_sd1_fields_refused_by_sdxl_unet_and_vice_versa(engine, tiny):
    from engine_helpers import Engine

    r = engine.request("a cat")
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs"):
        engine.steps.submit([replace(r, pooled_prompt_embeds=None)])
    sd1 = Engine(tiny)
    with pytest.raises(ValueError, match="no SDXL micro-conditioning"):
        sd1.steps.submit([replace(sd1.request("a cat"), add_time_ids=(64, 64, 0, 0, 64, 64))])
