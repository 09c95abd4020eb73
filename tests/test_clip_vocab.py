"""The CLIP vocabulary derived offline equals the real one (known ids from OpenAI's tokenizer)."""

import pytest

from deployments.engine.clip_vocab import CLIP_VOCAB_SIZE, build_clip_tokenizer, clip_vocab_and_merges


def test_vocab_size_and_specials():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == CLIP_VOCAB_SIZE == 49_408
    assert len(merges) == 48_894
    assert vocab["<|startoftext|>"] == 49_406
    assert vocab["<|endoftext|>"] == 49_407
    assert merges[0] == ("i", "n")


@pytest.mark.parametrize(
    "text, ids",
    [
        # Ids as OpenAI's CLIP tokenizer (and SD's tokenizer/vocab.json) gives them.
        ("a photograph of an astronaut riding a horse", [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]),
        ("a cat", [49406, 320, 2368, 49407]),
        ("", [49406, 49407]),
    ],
)
def test_known_token_ids(text, ids):
    assert build_clip_tokenizer()(text).input_ids == ids


def test_padding_to_context():
    ids = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
