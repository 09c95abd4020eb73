"""AUTOMATIC1111's prompt syntax: attention weights and ``<lora:name:weight>`` tags.

``parse_prompt_attention`` follows A1111's ``modules/prompt_parser.py`` (same tokens, same
arithmetic, same handling of unbalanced brackets), so a prompt written for A1111 weighs the same
words here. ``BREAK`` is not special: it is ordinary text. Pure Python; no torch, no Ray.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]

# A1111's tokens, in its order: escapes, brackets, ":weight)" closing a round bracket, plain text, a lone ":".
_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)

_LORA_TAG = re.compile(r"<lora:([^>]*)>")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` fragments; neighbours of equal weight are merged.

    ``(abc)`` multiplies the weight of ``abc`` by 1.1, ``[abc]`` divides it by 1.1, ``(abc:1.3)``
    multiplies it by 1.3; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal
    characters. A bracket left open applies to the end of the prompt; a closing bracket without
    an opening one is literal text.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("a (cat:1.3) and [dog]")
    [('a ', 1.0), ('cat', 1.3), (' and ', 1.0), ('dog', 0.9090909090909091)]
    """
    res: list[list] = []  # [[text, weight], ...]
    round_brackets: list[int] = []  # where each open "(" starts in ``res``
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                value = float(weight)
            except ValueError as e:
                raise ValueError(f"invalid attention weight {weight!r} in {token!r}: expected a number") from e
            multiply_range(round_brackets.pop(), value)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            res.append([token, 1.0])

    for start in round_brackets:
        multiply_range(start, ROUND_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, SQUARE_MULTIPLIER)

    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for fragment in res[1:]:
        if fragment[1] == merged[-1][1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(t, w) for t, w in merged]


class LoraTag(NamedTuple):
    """One ``<lora:name[@version][:weight]>`` tag of a prompt."""

    name: str
    version: int | None
    weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove ``<lora:...>`` tags from ``prompt``; return the remaining text and the tags, in order.

    The weight is optional (default 1.0); ``name@3`` pins version 3. A malformed tag raises
    ``ValueError`` naming it. Other ``<...>`` text is left alone.

    >>> extract_lora_tags("a harbour <lora:ink:0.8>, <lora:pastel@2>")
    ('a harbour , ', [LoraTag(name='ink', version=None, weight=0.8), LoraTag(name='pastel', version=2, weight=1.0)])
    """
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        tags.append(_parse_lora_tag(m.group(0), m.group(1)))
        return ""

    return _LORA_TAG.sub(found, prompt), tags


def _parse_lora_tag(tag: str, args: str) -> LoraTag:
    parts = [p.strip() for p in args.split(":")]
    if len(parts) > 2:
        raise ValueError(
            f"{tag}: expected <lora:name:weight>; separate text-encoder and UNet weights are not supported"
        )
    ref = parts[0]
    name, at, version = ref.partition("@")
    name = name.strip()
    version = version.strip()
    if not name:
        raise ValueError(f"{tag}: the adapter name is missing")
    if at and not (version.isdigit() and int(version) >= 1):
        raise ValueError(f"{tag}: the version after '@' must be a whole number >= 1, got {version!r}")
    weight = 1.0
    if len(parts) == 2:
        if not _NUMBER.fullmatch(parts[1]):
            raise ValueError(f"{tag}: the weight must be a number, got {parts[1]!r}")
        weight = float(parts[1])
    return LoraTag(name, int(version) if at else None, weight)
