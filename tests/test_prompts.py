"""Prompt encoding: equals the pipeline's encode_prompt, caches by token ids."""

import pytest
import torch

from deployments.engine.prompts import EmbeddingCache, PromptEncoder, count_tokens


def test_cache_is_lru_with_counts():
    cache = EmbeddingCache(2)
    a, b, c = (torch.full((1,), float(i)) for i in range(3))
    cache.put((1,), a)
    cache.put((2,), b)
    assert cache.get((1,)) is a  # (1,) is now most recent
    cache.put((3,), c)  # evicts (2,)
    assert cache.get((2,)) is None
    assert cache.get((3,)) is c
    assert (cache.hits, cache.misses, len(cache)) == (2, 1, 2)


def test_zero_capacity_caches_nothing():
    cache = EmbeddingCache(0)
    cache.put((1,), torch.zeros(1))
    assert len(cache) == 0 and cache.get((1,)) is None


def test_encode_equals_pipeline_and_hits_cache(tiny):
    from diffusers import StableDiffusionPipeline

    enc = PromptEncoder(tiny["tokenizer"], tiny["text_encoder"], cache_size=8)
    pos, neg, pos_again = enc.encode_prompt(["a cat", "blurry", "a   CAT"])  # CLIP lowercases, squeezes spaces
    assert torch.equal(pos, pos_again)
    assert (enc.cache.hits, enc.cache.misses, len(enc.cache)) == (0, 3, 2)
    enc.encode_prompt(["a cat"])
    assert enc.cache.hits == 1
    pipe = StableDiffusionPipeline(
        vae=tiny["vae"],
        text_encoder=tiny["text_encoder"],
        tokenizer=tiny["tokenizer"],
        unet=tiny["unet"],
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref_pos, ref_neg = pipe.encode_prompt("a cat", "cpu", 1, True, "blurry")
    assert (ref_pos[0] - pos).abs().max().item() < 1e-6
    assert (ref_neg[0] - neg).abs().max().item() < 1e-6
    assert pos.shape == (77, 64)


@pytest.mark.parametrize("text, n", [("", 2), ("a cat", 4), ("cat " * 80, 82)])
def test_count_tokens(tiny, text, n):
    assert count_tokens(tiny["tokenizer"], text) == n
