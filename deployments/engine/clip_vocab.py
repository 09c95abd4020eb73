"""The real CLIP BPE vocabulary, derived offline.

No model hub is reachable, so lorafleet ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
(``clip_bpe/``, with the MIT notices of OpenAI CLIP and open_clip, whose wheel it was copied
from). CLIP's own tokenizer (``clip/simple_tokenizer.py``) builds its 49,408-token vocabulary
from that file with the recipe below; the result is byte-for-byte the ``vocab.json``/``merges.txt``
pair that Stable Diffusion checkpoints ship in ``tokenizer/``.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49_408
# 49152 - 256 - 2 merges: the byte alphabet, its </w> forms and two specials fill the rest.
_NUM_MERGES = 49_152 - 256 - 2
# Vendored from OpenAI CLIP via open_clip (MIT; clip_bpe/LICENSE).
BPE_FILE = Path(__file__).with_name("clip_bpe") / "bpe_simple_vocab_16e6.txt.gz"


def bpe_file() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz``, package data of ``deployments.engine`` (pyproject.toml)."""
    path = BPE_FILE
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}: reinstall lorafleet")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return CLIP's ``(vocab, merges)``: 49,408 tokens and 48,894 merge rules."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"derived CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_vocab_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in the layout SD checkpoints use."""
    vocab, merges = clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` over the real vocabulary, with CLIP's 77-token context.

    ``pad_token``: SD's tokenizers pad with the end token; SDXL's ``tokenizer_2`` pads with ``"!"``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length, pad_token=pad_token)
