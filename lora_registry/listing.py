"""Adapter names in name order, from a store listing that comes in key order.

A store lists ``adapters/<name>/<version>.json`` keys character by character,
so a name's keys sort as ``<name>/``. Names sort as plain strings. The two
orders agree except where one name extends another with ``-`` or ``.``, which
sort before ``/``::

    names:  ink  <  ink-wash  <  ink.v2  <  ink0
    keys:   adapters/ink-wash/  <  adapters/ink.v2/  <  adapters/ink/  <  adapters/ink0/

``in_name_order`` turns the key-ordered stream into name order while reading
at most ``read_ahead`` names ahead: a name waits until every shorter name that
could sort before it (``ink`` for ``ink-wash``) is either seen, known absent
(the stream went past where its keys would be), or looked up on its own.

>>> keyed = [("ink-wash", 1), ("ink.v2", 2), ("ink", 3), ("ink0", 4)]
>>> [n for n, _ in in_name_order(iter(keyed), after=None, lookup=lambda n: None, read_ahead=8)]
['ink', 'ink-wash', 'ink.v2', 'ink0']
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from . import layout
from .stores.base import ObjectInfo

V = TypeVar("V")


def sorts_before_in_keys(name: str) -> list[str]:
    """The shorter names that come after ``name`` in key order but before it in name order, shortest first.

    >>> sorts_before_in_keys("ink-wash.v2")
    ['ink', 'ink-wash']
    """
    return [name[:i] for i, c in enumerate(name) if c in "-." and i > 0]


def listing_start(after: str | None) -> str | None:
    """The ``start_after`` key for names after ``after``: every such name's keys are greater than it.

    ``adapters/<after>`` itself, not ``adapters/<after>/``: names that extend
    ``after`` with ``-`` or ``.`` come after it but their keys sort before
    ``adapters/<after>/``.
    """
    return None if after is None else f"{layout.ADAPTERS_PREFIX}{after}"


def group_by_name(objects: Iterable[ObjectInfo]) -> Iterator[tuple[str, dict[int, bool]]]:
    """``(name, {version: deleted})`` per adapter name, in the listing's (key) order; other keys are skipped."""
    name: str | None = None
    versions: dict[int, bool] = {}
    for obj in objects:
        parsed = layout.parse_entry_key(obj.key)
        if parsed is None:
            continue
        entry_name, version, kind = parsed
        if entry_name != name:
            if name is not None:
                yield name, versions
            name, versions = entry_name, {}
        versions[version] = versions.get(version, False) or kind == "deleted"
    if name is not None:
        yield name, versions


def in_name_order(
    entries: Iterator[tuple[str, V]],
    *,
    after: str | None,
    lookup: Callable[[str], V | None],
    read_ahead: int,
) -> Iterator[tuple[str, V]]:
    """``entries`` (names in key order, from ``listing_start(after)``) as names in name order, after ``after``.

    ``lookup(name)`` reads one name on its own (``None``: no such name); it is
    called only when a name would otherwise wait for more than ``read_ahead``
    names of the stream (``style`` while thousands of ``style-...`` names come
    first), at most once per name.
    """
    if read_ahead < 1:
        raise ValueError(f"read_ahead must be >= 1, got {read_ahead}")
    waiting: list[str] = []  # heap, by name
    values: dict[str, V] = {}
    looked_up: set[str] = set()  # answered by lookup(): dropped if the stream brings them later
    last: str | None = None  # the last name the stream gave
    exhausted = False

    def passed(name: str) -> bool:
        """Has the stream gone past where ``name``'s keys would be?"""
        return exhausted or (last is not None and f"{last}/" > f"{name}/")

    def read() -> None:
        nonlocal last, exhausted
        try:
            name, value = next(entries)
        except StopIteration:
            exhausted = True
            return
        last = name
        if (after is not None and name <= after) or name in looked_up:
            return
        values[name] = value
        heapq.heappush(waiting, name)

    while True:
        if not waiting:
            if exhausted:
                return
            read()
            continue
        first = waiting[0]
        blockers = [
            shorter
            for shorter in sorts_before_in_keys(first)
            if (after is None or shorter > after) and shorter not in looked_up and not passed(shorter)
        ]
        if blockers and len(waiting) < read_ahead:
            read()
            continue
        for shorter in blockers:  # shortest first: that is their name order
            looked_up.add(shorter)
            value = lookup(shorter)
            if value is not None:
                yield shorter, value
        heapq.heappop(waiting)
        yield first, values.pop(first)
