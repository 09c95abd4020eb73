"""AUTOMATIC1111's prompt syntax: attention weights, ``BREAK``, prompt editing, alternation, ``AND``
and ``<lora:name:weight>`` tags.

Each function follows A1111's ``modules/prompt_parser.py``, so a prompt written for A1111 means the
same here:

- ``parse_prompt_attention``: ``(word:1.3)`` / ``(word)`` / ``[word]`` weights (same tokens, same
  arithmetic, same handling of unbalanced brackets), and ``BREAK`` as a chunk boundary marker;
- ``prompt_schedule``: prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
  alternation ``[a|b]``: the prompt's text at each sampling step
  (``get_learned_conditioning_prompt_schedules``);
- ``split_and``: ``a cat :1.2 AND a dog :0.8``, composable diffusion's parts and weights
  (``get_multicond_prompt_list``).

Malformed syntax is never an error: as in A1111, what does not parse is text. Pure Python; no
torch, no Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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

# A1111's BREAK: the word on its own, with the whitespace around it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_WEIGHT = -1.0  # the weight of the ("BREAK", -1.0) marker fragment, as in A1111

_LORA_TAG = re.compile(r"<lora:([^>]*)>")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` fragments; neighbours of equal weight are merged.

    ``(abc)`` multiplies the weight of ``abc`` by 1.1, ``[abc]`` divides it by 1.1, ``(abc:1.3)``
    multiplies it by 1.3; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal
    characters. A bracket left open applies to the end of the prompt; a closing bracket without
    an opening one is literal text. ``BREAK`` (the word, in capitals) becomes the marker fragment
    ``("BREAK", -1.0)``: the tokenizer ends the 75-token chunk there (``prompts.tokenize_chunks``).
    As in A1111, a BREAK inside brackets has its marker weight multiplied, and so is plain text.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("a (cat:1.3) and [dog]")
    [('a ', 1.0), ('cat', 1.3), (' and ', 1.0), ('dog', 0.9090909090909091)]
    >>> parse_prompt_attention("a cat BREAK a dog")
    [('a cat', 1.0), ('BREAK', -1.0), ('a dog', 1.0)]
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
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])

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


# -- prompt editing and alternation ([from:to:when], [a|b]) ------------------------------------------
#
# A1111 parses with a lark (Earley) grammar. Earley's time grows steeply with nested or repeated
# brackets (a 2,400-character prompt of 200 edits takes 100 s), so this is a hand-written parser of
# the same language, linear in the prompt: tests/test_prompt_schedules.py checks it against A1111's
# own examples. The language, read from A1111's grammar:
#
# - Inside brackets everything must parse: ``(p)``, ``(p:p)``, ``[p]`` (emphasis: kept verbatim),
#   ``[p:N]`` / ``[p:p:N]`` (prompt editing: N a number, whitespace around it allowed) and
#   ``[p|p|...]`` (alternation, options may be empty); ``\x`` is the character x kept escaped.
# - At the top level a bracket that opens no such group, a stray ``]`` ``)`` or ``:`` is text; a
#   bracket that opens a valid group opens it. (Where stray brackets touch an edit with an empty
#   part, e.g. ``][[:0.5]:]``, A1111's Earley parser may resolve the ambiguity the other way, as
#   text; random fuzzing against it finds such a case in about 1 of 20,000 short bracket soups.)
# - A ``|`` outside alternation, or a backslash at the end or before a newline, makes the whole
#   prompt text (A1111's parse error).

# A1111's NUMBER (lark's SIGNED_NUMBER) between the last ':' of an edit and its ']'.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?))\s*")
_SPECIAL = frozenset("\\[]():|")
# Deeper bracket nesting than this makes the prompt text (A1111 would parse it, very slowly).
MAX_BRACKET_DEPTH = 64


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: tuple | None  # items
    after: tuple
    when: str  # the number as written: "0.5" is a fraction of the steps, "3" a step


@dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple, ...]  # items per option


class _NoGroup(Exception):
    """The bracket at this position opens no valid group."""


class _Unparsable(Exception):
    """The prompt is not in the language: A1111 takes it as text."""


class _ScheduleParser:
    """One prompt's items: text pieces (str), ``_Edit`` and ``_Alternation``."""

    def __init__(self, text: str):
        self.s = text
        self.groups: dict[int, tuple[list, int] | None] = {}  # start -> (items, end) or None: memo

    def parse(self) -> list:
        s, n, items, j = self.s, len(self.s), [], 0
        while j < n:
            c = s[j]
            group = self.group(j, 1) if c in "[(" else None
            if group is not None:
                items += group[0]
                j = group[1]
            elif c in "[]():":
                items.append(c)  # a bracket that opens no group, a stray closer or colon: text
                j += 1
            elif c == "|":
                raise _Unparsable
            else:
                j = self.plain(j, items, _Unparsable)
        return items

    def plain(self, j: int, items: list, error: type[Exception]) -> int:
        """Text from ``j`` up to the next special character, or one escape; raises ``error`` on a bad escape."""
        s = self.s
        if s[j] == "\\":
            if j + 1 >= len(s) or s[j + 1] == "\n":
                raise error
            items.append(s[j : j + 2])
            return j + 2
        k = j
        while k < len(s) and s[k] not in _SPECIAL:
            k += 1
        items.append(s[j:k])
        return k

    def group(self, start: int, depth: int) -> tuple[list, int] | None:
        """The group opened at ``start``: (items, index after its closing bracket), or None."""
        if start not in self.groups:
            try:
                self.groups[start] = self._group(start, depth)
            except _NoGroup:
                self.groups[start] = None
        return self.groups[start]

    def _group(self, start: int, depth: int) -> tuple[list, int]:
        if depth > MAX_BRACKET_DEPTH:
            raise _Unparsable
        s, n = self.s, len(self.s)
        opener = s[start]
        closer = "]" if opener == "[" else ")"
        segments: list[list] = [[]]  # items between separators at this level
        separators: list[tuple[str, int]] = []  # (":" or "|", position)
        j = start + 1
        while True:
            if j >= n:
                raise _NoGroup
            c = s[j]
            if c == closer:
                break
            if c in "[(":
                group = self.group(j, depth + 1)
                if group is None:
                    raise _NoGroup  # inside brackets everything must parse
                segments[-1] += group[0]
                j = group[1]
            elif c in ")]":
                raise _NoGroup
            elif c in ":|":
                separators.append((c, j))
                segments.append([])
                j += 1
            else:
                j = self.plain(j, segments[-1], _NoGroup)
        end = j + 1
        kinds = {c for c, _ in separators}
        if opener == "(":
            if "|" in kinds or len(separators) > 1:
                raise _NoGroup
            items = ["(", *segments[0]]
            if separators:
                items += [":", *segments[1]]
            return [*items, ")"], end
        if not separators:
            return ["[", *segments[0], "]"], end
        if kinds == {"|"}:
            return [_Alternation(tuple(tuple(seg) for seg in segments))], end
        if kinds != {":"} or len(separators) > 2:
            raise _NoGroup
        when = _WHEN.fullmatch(s, separators[-1][1] + 1, j)
        if when is None:
            raise _NoGroup
        before = tuple(segments[0]) if len(separators) == 2 else None
        return [_Edit(before, tuple(segments[-2]), when.group(1))], end


def _edit_step(when: str, steps: int) -> int:
    """A1111's step of an edit: "0.5" (a decimal point) is a fraction of ``steps``, "3" a step number.

    Capped at ``steps``; below 1 the edit never applies its ``before`` part (A1111's new scheduling,
    its default since 1.6; without hires fix).
    """
    value = float(when)
    if "." in when:
        value *= steps
    return min(steps, int(value))


def _collect_steps(items, steps: int, found: set[int]) -> None:
    for item in items:
        if isinstance(item, _Edit):
            step = _edit_step(item.when, steps)
            if step >= 1:
                found.add(step)
            _collect_steps(item.before or (), steps, found)
            _collect_steps(item.after, steps, found)
        elif isinstance(item, _Alternation):
            found.update(range(1, steps + 1))
            for option in item.options:
                _collect_steps(option, steps, found)


def _text_at(items, step: int, steps: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            chosen = (item.before or ()) if step <= _edit_step(item.when, steps) else item.after
            out.append(_text_at(chosen, step, steps))
        else:
            out.append(_text_at(item.options[(step - 1) % len(item.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The prompt's text over ``steps`` sampling steps: ``[(end_at_step, text), ...]``, steps ascending.

    A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt (no hires fix): entry i
    applies at the steps after the previous entry's end, up to and including its own end (the
    sampler's step index, counted from 0, is compared with ``<=``). ``[from:to:when]`` is ``from``
    until step ``when`` then ``to``; ``when`` with a decimal point is a fraction of the steps, else
    a step number. ``[to:when]`` adds ``to`` at ``when``; ``[from::when]`` removes ``from``.
    ``[a|b]`` alternates at every step. Edits nest. A prompt that does not parse is its own text.

    >>> prompt_schedule("a [cat:dog:0.5] in snow", 10)
    [(5, 'a cat in snow'), (10, 'a dog in snow')]
    >>> prompt_schedule("[fox|owl]", 3)
    [(1, 'fox'), (2, 'owl'), (3, 'fox')]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if "[" not in prompt:  # no edit or alternation can start: the prompt is its own text
        return [(steps, prompt)]
    try:
        items = _ScheduleParser(prompt).parse()
    except (_Unparsable, RecursionError):
        return [(steps, prompt)]
    found = {steps}
    _collect_steps(items, steps, found)
    return [(step, _text_at(items, step, steps)) for step in sorted(found)]


# -- AND: composable diffusion ----------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
# The ":weight" ending an AND part (A1111's re_weight), read from the part's last ':'.
_PART_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The prompt's ``AND`` parts and their weights: A1111's ``get_multicond_prompt_list`` for one prompt.

    A part's weight is a trailing ``:number`` (default 1.0), removed from its text along with the
    whitespace before it; trailing whitespace is removed too. ``AND`` must be a word in capitals.
    A prompt without AND is one part (and may still have a weight).

    >>> split_and("a cat :1.2 AND a dog :0.8")
    [('a cat', 1.2), (' a dog', 0.8)]
    >>> split_and("a lighthouse")
    [('a lighthouse', 1.0)]
    """
    return [_part_weight(part) for part in _AND.split(prompt)]


def _part_weight(part: str) -> tuple[str, float]:
    # A1111's lazy regex, in linear time: "text<ws>:<ws>number<ws>" or "text<ws>".
    colon = part.rfind(":")
    if colon >= 0:
        m = _PART_WEIGHT.fullmatch(part, colon + 1)
        if m is not None:
            return part[:colon].rstrip(), float(m.group(1))
    return part.rstrip(), 1.0


Schedule = tuple[tuple[int, str], ...]  # ((end_at_step, text), ...): prompt_schedule's entries


@dataclass(frozen=True)
class PromptPlan:
    """A request's prompts over its steps, before encoding (A1111's ``get_multicond_learned_conditioning``).

    ``parts``: per AND part, its schedule; ``weights``: per part. ``negative``: the negative
    prompt's schedule (A1111 reads AND in the positive prompt only).
    """

    parts: tuple[Schedule, ...]
    weights: tuple[float, ...]
    negative: Schedule

    @property
    def composable(self) -> bool:
        """Guidance over several weighted parts (A1111's ``combine_denoised``), not plain CFG."""
        return len(self.parts) > 1 or self.weights != (1.0,)

    @property
    def scheduled(self) -> bool:
        """Anything beyond one positive and one negative text for every step."""
        return self.composable or len(self.parts[0]) > 1 or len(self.negative) > 1


def plan_prompts(prompt: str, negative_prompt: str, steps: int) -> PromptPlan:
    """Split ``prompt`` at AND, schedule every part and the negative prompt over ``steps``.

    A prompt without the syntax is one part of weight 1.0 whose single entry is the prompt itself,
    character for character (so it encodes exactly as before).

    >>> plan_prompts("a [cat:dog:0.5] AND snow :0.5", "", 4).parts
    (((2, 'a cat'), (4, 'a dog')), ((4, ' snow'),))
    """
    parts = split_and(prompt)
    if len(parts) == 1 and parts[0][1] == 1.0:
        parts = [(prompt, 1.0)]  # not even trailing whitespace removed
    return PromptPlan(
        parts=tuple(tuple(prompt_schedule(text, steps)) for text, _ in parts),
        weights=tuple(weight for _, weight in parts),
        negative=tuple(prompt_schedule(negative_prompt, steps)),
    )


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
