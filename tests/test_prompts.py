"""Prompt encoding: equals the pipeline's encode_prompt, caches by token ids; A1111 weighting and
77-token chunks, checked on the embedding arithmetic."""

import copy

import pytest
import torch

from deployments.engine.prompts import (
    EmbeddingCache,
    PromptEncoder,
    apply_prompt_weights,
    chunk_count,
    count_tokens,
    tokenize_weighted,
)


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

    enc = PromptEncoder(tiny["tokenizer"], tiny["text_encoder"], cache_size=8, rowwise=True)
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
    # One row per call: exactly the call diffusers makes for one prompt.
    assert torch.equal(ref_pos[0], pos) and torch.equal(ref_neg[0], neg)
    assert pos.shape == (77, 64)


@pytest.mark.parametrize("text, n", [("", 2), ("a cat", 4), ("cat " * 80, 82)])
def test_count_tokens(tiny, text, n):
    assert count_tokens(tiny["tokenizer"], text) == n


# ---- A1111 weighting and 77-token chunks --------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_parts(tiny):
    """The tiny CLIP, encoded one row per call: a row's embedding never depends on its batch-mates."""
    return tiny["tokenizer"], copy.deepcopy(tiny["text_encoder"])


def fresh(encoder_parts, cache_size=0, lora=None):
    tokenizer, text_encoder = encoder_parts
    return PromptEncoder(tokenizer, text_encoder, cache_size=cache_size, lora=lora, rowwise=True)


CAT, DOG = 2368, 1929  # CLIP ids of "cat" and "dog"


@pytest.mark.parametrize(
    "text, ids, weights",
    [
        ("a cat", [320, CAT], [1.0, 1.0]),
        ("a (cat:1.3)", [320, CAT], [1.0, 1.3]),
        ("(a cat)", [320, CAT], [1.1, 1.1]),
        ("[dog] cat", [DOG, CAT], [1 / 1.1, 1.0]),
        (r"\(cat\)", [263, CAT, 264], [1.0, 1.0, 1.0]),  # escaped brackets are tokens
        ("", [], []),
    ],
)
def test_tokenize_weighted(tiny, text, ids, weights):
    got_ids, got_weights = tokenize_weighted(tiny["tokenizer"], text)
    assert got_ids == ids
    assert got_weights == pytest.approx(weights, rel=1e-12)


@pytest.mark.parametrize("n, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count(n, chunks):
    assert chunk_count(n, 75) == chunks


@pytest.mark.parametrize("text", ["a cat", "", "cat " * 75, r"a red house by the sea, \(escaped\) brackets"])
def test_short_unweighted_prompts_tokenize_as_diffusers_does(tiny, text):
    tok = tiny["tokenizer"]
    enc = PromptEncoder(tok, tiny["text_encoder"])
    (prompt,) = enc.tokenize([text])
    reference = tok(text.replace("\\", ""), padding="max_length", max_length=77, truncation=True).input_ids
    assert prompt.chunks == (tuple(reference),) and prompt.weights is None


def test_weight_one_gives_exactly_the_unweighted_embedding(encoder_parts):
    plain = fresh(encoder_parts).encode_prompt(["a cat on a mat"])[0]
    for text in ["a (cat:1.0) on a mat", "(a cat on a mat:1)", "a (cat: 1.00 ) on (a:1) mat"]:
        (weighted,) = fresh(encoder_parts).encode_prompt([text])
        assert torch.equal(weighted, plain), text
    (prompt,) = fresh(encoder_parts).tokenize(["a (cat:1.0) on a mat"])
    assert prompt.weights is None  # weighting is skipped, not multiplied by ones


@pytest.mark.parametrize(
    "z, weights, expected",
    [
        # the mean (3) is restored after weighting (mean 2 -> factor 1.5)
        ([[2.0], [4.0]], [1.0, 0.5], [[3.0], [3.0]]),
        # all weights 1: unchanged
        ([[2.0], [-6.0]], [1.0, 1.0], [[2.0], [-6.0]]),
        # the original mean is 0: A1111 would multiply by 0; the weighted embedding stays as is
        ([[2.0], [-2.0]], [1.5, 0.5], [[3.0], [-1.0]]),
        # the weighted mean is 0: A1111 would divide by 0 (inf); the weighted embedding stays as is
        ([[2.0], [4.0]], [2.0, -1.0], [[4.0], [-4.0]]),
        # two chunks, each restored to its own mean
        ([[2.0], [4.0], [1.0], [1.0]], [1.0, 0.5, 2.0, 1.0], [[3.0], [3.0], [4 / 3], [2 / 3]]),
    ],
)
def test_apply_prompt_weights(z, weights, expected):
    got = apply_prompt_weights(torch.tensor(z), torch.tensor(weights), chunk_length=2)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)
    assert torch.isfinite(got).all()


def test_weight_scales_exactly_the_tokens_of_the_word_then_restores_the_mean(encoder_parts):
    """On an encoder whose embeddings have a mean (as real CLIP's do): the word scaled, the mean restored."""
    tokenizer, text_encoder = encoder_parts
    text_encoder = copy.deepcopy(text_encoder)
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.fill_(0.5)  # random init leaves it 0: embeddings of mean 0

    def encode(text):
        return PromptEncoder(tokenizer, text_encoder, cache_size=0, rowwise=True).encode_prompt([text])[0]

    z = encode("a red cat on a mat")  # [77, hidden]
    zw = encode("a red (cat:1.3) on a mat")
    ids = fresh(encoder_parts).tokenize(["a red cat on a mat"])[0].chunks[0]
    cat = ids.index(CAT)
    assert cat == 3  # start, a, red, cat
    w = torch.ones(77)
    w[cat] = 1.3
    scaled = z * w[:, None]
    ratio = z.mean() / scaled.mean()
    assert abs(ratio.item() - 1.0) > 1e-4  # mean restoring really does something here
    torch.testing.assert_close(zw, scaled * ratio, rtol=1e-6, atol=1e-7)
    others = torch.ones(77, dtype=torch.bool)
    others[cat] = False
    # every other token only carries the mean-restoring ratio; the cat token carries 1.3 as well
    torch.testing.assert_close(zw[others] / z[others], torch.full_like(z[others], ratio.item()), rtol=1e-5, atol=0)


def test_weighting_on_a_zero_mean_encoder_scales_the_word_and_stays_finite(encoder_parts):
    """The embedded model's CLIP has embeddings of mean 0: weights apply, the mean is left alone."""
    z = fresh(encoder_parts).encode_prompt(["a red cat on a mat"])[0]
    zw = fresh(encoder_parts).encode_prompt(["a red (cat:1.3) on a mat"])[0]
    w = torch.ones(77)
    w[3] = 1.3
    assert torch.isfinite(zw).all()
    assert torch.equal(zw, z * w[:, None])


def test_apply_prompt_weights_restores_each_chunks_mean_on_its_own():
    torch.manual_seed(0)
    z = torch.randn(2 * 5, 3) + 0.5  # two chunks of 5 tokens
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0] + [1.0] * 5)
    out = apply_prompt_weights(z, w, chunk_length=5)
    assert torch.equal(out[5:], z[5:])  # an all-ones chunk is untouched
    first = z[:5] * w[:5, None]
    torch.testing.assert_close(out[:5], first * (z[:5].mean() / first.mean()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[:5].mean(), z[:5].mean())


def test_long_prompt_encodes_in_77_token_chunks(encoder_parts):
    words = ["cat", "dog"] * 50  # 100 tokens, one each
    long_text = " ".join(words)
    enc = fresh(encoder_parts)
    (prompt,) = enc.tokenize([long_text])
    assert len(prompt.chunks) == 2 and all(len(c) == 77 for c in prompt.chunks)
    (z,) = enc.encode_prompt([long_text])
    assert z.shape == (154, 64)
    first = fresh(encoder_parts).encode_prompt([" ".join(words[:75])])[0]
    second = fresh(encoder_parts).encode_prompt([" ".join(words[75:])])[0]
    assert torch.equal(z[:77], first)
    assert torch.equal(z[77:], second)
    assert not torch.equal(z[:77], z[77:])


def test_weights_follow_their_tokens_into_the_second_chunk(encoder_parts):
    words = ["cat", "dog"] * 50
    weighted = " ".join(words[:80]) + " (" + " ".join(words[80:]) + ":1.4)"
    (prompt,) = fresh(encoder_parts).tokenize([weighted])
    assert prompt.weights[:77] == (1.0,) * 77  # first chunk: unweighted
    assert prompt.weights[77:] == (1.0,) * 6 + (1.4,) * 20 + (1.0,) * 51  # start, 5 plain, 20 weighted, end+pad
    plain = fresh(encoder_parts).encode_prompt([" ".join(words)])[0]
    (z,) = fresh(encoder_parts).encode_prompt([weighted])
    assert torch.equal(z[:77], plain[:77])
    assert not torch.equal(z[77:], plain[77:])


@pytest.mark.parametrize("long_side", ["positive", "negative"])
def test_positive_and_negative_get_the_same_chunk_count(encoder_parts, long_side):
    long_text = "cat dog " * 60  # 120 tokens: 2 chunks
    prompts, negatives = (["(" + long_text + ")"], ["blurry"]) if long_side == "positive" else (["a cat"], [long_text])
    enc = fresh(encoder_parts)
    ((pos, neg),) = enc.encode_prompt_pairs(prompts, negatives)
    assert pos.shape == neg.shape == (154, 64)
    short = neg if long_side == "positive" else pos
    short_alone = fresh(encoder_parts).encode_prompt([negatives[0] if long_side == "positive" else prompts[0]])[0]
    empty = fresh(encoder_parts).encode_prompt([""])[0]
    assert torch.equal(short[:77], short_alone)
    assert torch.equal(short[77:], empty)  # padded with an encoded empty chunk, as A1111 does
    (long_alone,) = fresh(encoder_parts).encode_prompt([prompts[0] if long_side == "positive" else long_text])
    assert torch.equal(neg if long_side == "negative" else pos, long_alone)


def test_pairs_of_equal_length_are_not_padded(encoder_parts):
    ((pos, neg),) = fresh(encoder_parts).encode_prompt_pairs(["a cat"], ["blurry"])
    assert pos.shape == neg.shape == (77, 64)


def test_cache_key_distinguishes_weights(encoder_parts):
    enc = fresh(encoder_parts, cache_size=8)
    a, b = enc.encode_prompt(["a (cat:1.3)", "a (cat:1.5)"])
    assert (enc.cache.misses, len(enc.cache)) == (2, 2)
    assert not torch.equal(a, b)
    again, plain, plain_again = enc.encode_prompt(["a (cat:1.3)", "a cat", "a (cat:1.0)"])
    assert again is a  # from the cache
    assert (enc.cache.hits, enc.cache.misses, len(enc.cache)) == (1, 4, 3)  # "a cat" == "a (cat:1.0)": one key
    assert torch.equal(plain, plain_again)


@pytest.mark.parametrize("rowwise", [False, True])
def test_all_chunks_of_a_batch_share_one_forward(encoder_parts, rowwise):
    enc = PromptEncoder(*encoder_parts, cache_size=0, rowwise=rowwise)
    calls = []
    hook = enc.text_encoder.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape))
    try:
        enc.encode_prompt_pairs(["cat dog " * 60, "a cat"], ["", "cat dog " * 60])
    finally:
        hook.remove()
    # distinct rows: 2 long chunks, the empty chunk, "a cat" (the long negative repeats the long chunks);
    # rowwise (deterministic mode): each of them in a call of its own
    assert calls == ([torch.Size([1, 77])] * 4 if rowwise else [torch.Size([4, 77])])


def test_text_adapters_route_every_chunk(tiny, tiny_dir, tmp_path, encoder_parts):
    from deployments.engine.multi_lora import MultiLoRAModel, text_encoder_key_prefix
    from lora_registry.base_model import base_model_spec_from_dir
    from lora_registry.validation import prepare_adapter

    from lora_helpers import make_peft_lora_file

    path = make_peft_lora_file(
        tiny, tmp_path / "te", seed=5, rank=2, alpha=2, unet_targets=["to_k"], text_targets=["q_proj", "fc1"]
    )
    adapter = prepare_adapter(path.read_bytes(), base_model_spec_from_dir(tiny_dir)).adapter
    text_encoder = copy.deepcopy(encoder_parts[1])
    lora = MultiLoRAModel(
        text_encoder,
        ["q_proj", "fc1"],
        num_slots=2,
        max_rank=4,
        key_prefix=text_encoder_key_prefix(text_encoder),
    )
    lora.load(1, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("text_encoder").items()})
    enc = PromptEncoder(encoder_parts[0], text_encoder, cache_size=0, lora=lora, rowwise=True)
    words = ["cat", "dog"] * 50
    te = ((1, 1.0, "te@1"),)
    with_lora, without = enc.encode_prompt([" ".join(words), " ".join(words)], [te, ()])
    first, second = enc.encode_prompt([" ".join(words[:75]), " ".join(words[75:])], [te, te])
    assert torch.equal(with_lora[:77], first) and torch.equal(with_lora[77:], second)
    base = fresh(encoder_parts).encode_prompt([" ".join(words)])[0]
    assert torch.equal(without, base)
    assert (with_lora - base).abs().max().item() > 1e-3
