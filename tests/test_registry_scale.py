"""The registry at scale: paged listing that reads only its page, and a request path that lists one name.

Registries of a few hundred names are made by writing manifests straight into the store
(``seed_names``: copies of one real registration's manifest under other names), which is what
a registration's last write does; the listing cannot tell the difference.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from lora_registry import DiskCache, Manifest, MemoryCache, Registry, layout
from lora_registry import registry as registry_module
from lora_registry.listing import group_by_name, in_name_order, listing_start, sorts_before_in_keys
from lora_registry.stores import ObjectInfo, Store

from registry_helpers import small_lora_bytes

pytest_plugins = ["registry_helpers"]


class CountingStore(Store):
    """Delegates to a real store, recording every call and how many listed keys the caller consumed."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.uri = inner.uri
        self.calls: list[tuple] = []
        self.keys_read = 0

    def reset(self) -> None:
        self.calls.clear()
        self.keys_read = 0

    def lists(self) -> list[tuple[str, str | None]]:
        return [call[1:] for call in self.calls if call[0] == "list"]

    def put_bytes(self, key, data, progress=None):
        self.calls.append(("put_bytes", key))
        return self.inner.put_bytes(key, data, progress)

    def put_if_absent(self, key, data):
        self.calls.append(("put_if_absent", key))
        return self.inner.put_if_absent(key, data)

    def get_bytes(self, key):
        self.calls.append(("get_bytes", key))
        return self.inner.get_bytes(key)

    def download(self, key, dest, progress=None):
        self.calls.append(("download", key))
        return self.inner.download(key, dest, progress)

    def copy(self, src, dst):
        self.calls.append(("copy", src, dst))
        return self.inner.copy(src, dst)

    def delete(self, key):
        self.calls.append(("delete", key))
        return self.inner.delete(key)

    def list(self, prefix, start_after=None):
        self.calls.append(("list", prefix, start_after))
        for obj in self.inner.list(prefix, start_after=start_after):
            self.keys_read += 1
            yield obj

    def head(self, key):
        self.calls.append(("head", key))
        return self.inner.head(key)


def seed_names(store: Store, template: Manifest, names, versions=(1,)) -> None:
    """Manifests for ``names`` (each at ``versions``), copied from ``template``, written as registration does."""
    for name in names:
        for version in versions:
            manifest = dataclasses.replace(template, name=name, version=version)
            store.put_bytes(layout.manifest_key(name, version), manifest.to_json())


def tombstone(store: Store, name: str, version: int = 1) -> None:
    store.put_bytes(layout.tombstone_key(name, version), b"{}")


def node(store, spec, tmp_path, label="node", **kwargs) -> Registry:
    kwargs.setdefault("manifest_ttl_s", 0.0)
    return Registry(store, base=spec, cache=DiskCache(tmp_path / label, 1 << 30), memory=MemoryCache(1 << 30), **kwargs)


def reference_page(live: dict[str, Manifest], tag, limit, after):
    """Today's semantics, over the whole registry: names sorted; cursor iff a live name follows the page."""
    names = sorted(n for n in live if after is None or n > after)
    out = []
    for i, name in enumerate(names):
        if tag is not None and tag not in live[name].tags:
            continue
        out.append(name)
        if len(out) == limit:
            return out, (name if i < len(names) - 1 else None)
    return out, None


def all_pages(registry: Registry, **kwargs) -> tuple[list[str], list[int]]:
    """Every name, paging until the cursor is None, and the page sizes."""
    names, sizes, after = [], [], None
    while True:
        page, after = registry.list(after=after, **kwargs)
        names += [e.name for e in page]
        sizes.append(len(page))
        if after is None:
            return names, sizes


# -- key order vs name order (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ink", []),
        ("ink-wash", ["ink"]),
        ("ink.v2", ["ink"]),
        ("ink_wash", []),
        ("a-b.c-d", ["a", "a-b", "a-b.c"]),
        ("x--y", ["x", "x-"]),
    ],
)
def test_sorts_before_in_keys(name, expected):
    assert sorts_before_in_keys(name) == expected


def keyed(names) -> list[tuple[str, str]]:
    """``(name, name)`` in the order a store lists the names' keys."""
    return [(n, n) for n in sorted(names, key=lambda n: n + "/")]


def run_in_name_order(names, after, read_ahead):
    lookups = []

    def lookup(name):
        lookups.append(name)
        return name if name in names else None

    start = listing_start(after)
    stream = [(n, v) for n, v in keyed(names) if start is None or layout.name_prefix(n) > start]
    out = [n for n, _ in in_name_order(iter(stream), after=after, lookup=lookup, read_ahead=read_ahead)]
    return out, lookups


@pytest.mark.parametrize(
    "names, after, read_ahead, expected, lookups",
    [
        (["ink0", "ink", "ink.v2", "ink-wash"], None, 8, ["ink", "ink-wash", "ink.v2", "ink0"], []),
        (["ink0", "ink", "ink.v2", "ink-wash"], "ink", 8, ["ink-wash", "ink.v2", "ink0"], []),
        (["ink0", "ink", "ink.v2", "ink-wash"], "ink-wash", 8, ["ink.v2", "ink0"], []),
        # "ink" waits for "ink-a".."ink-e": past read_ahead it is looked up once, not waited for.
        (
            ["ink", "ink-a", "ink-b", "ink-c", "ink-d", "ink-e"],
            None,
            2,
            ["ink", "ink-a", "ink-b", "ink-c", "ink-d", "ink-e"],
            ["ink"],
        ),  # noqa: E501
        (
            ["ink-a", "ink-b", "ink-c", "ink-d", "ink-e", "pastel"],
            None,
            2,
            ["ink-a", "ink-b", "ink-c", "ink-d", "ink-e", "pastel"],
            ["ink"],
        ),  # noqa: E501
        (["ink-a", "ink-b", "ink-c"], "ink", 1, ["ink-a", "ink-b", "ink-c"], []),  # "ink" is the cursor: never read
        (
            ["a", "a-b", "a-b-c", "a-b0", "a.c", "a0", "b"],
            None,
            1,
            ["a", "a-b", "a-b-c", "a-b0", "a.c", "a0", "b"],
            ["a", "a-b"],
        ),  # noqa: E501
        (["a", "a-b", "a-b-c", "a-b0", "a.c", "a0", "b"], "a-b", 1, ["a-b-c", "a-b0", "a.c", "a0", "b"], []),
        ([], None, 1, [], []),
    ],
)
def test_in_name_order(names, after, read_ahead, expected, lookups):
    assert run_in_name_order(set(names), after, read_ahead) == (expected, lookups)


def test_in_name_order_matches_sorting_on_random_registries():
    rng = random.Random(7)
    for _ in range(3000):
        names = {rng.choice("ab0") + "".join(rng.choice("ab-.0_") for _ in range(rng.randint(0, 5))) for _ in range(20)}
        after = rng.choice([None, *sorted(names)])
        out, lookups = run_in_name_order(names, after, rng.randint(1, 6))
        assert out == sorted(n for n in names if after is None or n > after), (names, after)
        assert len(lookups) == len(set(lookups))


# -- Store.list(prefix, start_after) -----------------------------------------------------------

STORE_KEYS = [
    "adapters/a/00000001.json",
    "adapters/a-b/00000001.json",
    "adapters/a-b/00000002.deleted",
    "adapters/a-b/00000002.json",
    "adapters/a.b/00000001.json",
    "adapters/a0/00000001.json",
    "adapters/a_b/00000001.json",
    "adapters/b/00000001.json",
    "blobs/0f.safetensors",
    "staging/x.safetensors",
]


LIST_PREFIXES = ["", "adapters/", "adapters/a", "adapters/a/", "adapters/a-b/", "blobs/", "nope/"]
LIST_STARTS = [
    None, "adapters/a", "adapters/a-b", "adapters/a-b/00000001.json", "adapters/a-b/00000002.deleted", "adapters/a/",
    "adapters/b", "z",
]  # fmt: skip


def test_store_lists_in_key_order_from_start_after(adapter_store):
    for key in reversed(STORE_KEYS):
        adapter_store.put_bytes(key, b"x")
    for prefix in LIST_PREFIXES:
        assert [o.key for o in adapter_store.list(prefix)] == sorted(k for k in STORE_KEYS if k.startswith(prefix))
        for start_after in LIST_STARTS:
            expected = sorted(
                k for k in STORE_KEYS if k.startswith(prefix) and (start_after is None or k > start_after)
            )
            got = [o.key for o in adapter_store.list(prefix, start_after=start_after)]
            assert got == expected, (prefix, start_after)


def test_s3_list_stops_requesting_when_the_caller_stops(moto_s3):
    from lora_registry import open_store

    store = open_store(f"s3://{moto_s3.new_bucket()}/p", **moto_s3.store_options(list_page_keys=2))
    for i in range(9):
        store.put_bytes(f"adapters/n{i}/00000001.json", b"x")
    requests = []
    store.client.meta.events.register(
        "provide-client-params.s3.ListObjectsV2", lambda params, **kwargs: requests.append(dict(params))
    )
    listing = store.list("adapters/", start_after="adapters/n3/00000001.json")
    assert [next(listing).key for _ in range(3)] == [f"adapters/n{i}/00000001.json" for i in (4, 5, 6)]
    listing.close()
    assert len(requests) == 2  # keys n4 n5, then n6 n7: nothing past the page the caller reached
    assert (requests[0]["StartAfter"], requests[0]["MaxKeys"]) == ("p/adapters/n3/00000001.json", 2)
    assert "StartAfter" not in requests[1] and requests[1]["ContinuationToken"]
    assert [o.key for o in store.list("adapters/")] == [f"adapters/n{i}/00000001.json" for i in range(9)]


def test_local_list_reads_directories_as_the_caller_goes(tmp_path, monkeypatch):
    from lora_registry import open_store

    store = open_store(str(tmp_path / "store"))
    for i in range(20):
        store.put_bytes(f"adapters/n{i:02d}/00000001.json", b"x")
    scanned = []
    real_scandir = os.scandir

    def scandir(path):
        scanned.append(os.path.relpath(path, store.root))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = store.list("adapters/", start_after="adapters/n15/00000001.json")
    assert next(listing).key == "adapters/n16/00000001.json"
    assert scanned == ["adapters", "adapters/n15", "adapters/n16"]  # n00..n14 skipped whole; n17.. not read yet
    listing.close()


# -- Registry.list -------------------------------------------------------------------------------


@pytest.fixture
def template(adapter_store, registry_tiny_spec, tmp_path) -> Manifest:
    """One real registration in ``adapter_store`` (name ``seed``), whose manifest the seeded names copy."""
    return node(adapter_store, registry_tiny_spec, tmp_path, "writer").register(
        small_lora_bytes(registry_tiny_spec), name="seed", tags=["art"]
    )


MIXED_NAMES = [
    "ink", "ink-wash", "ink-wash.v2", "ink.v2", "ink0", "ink_x", "pastel", "pastel-1", "pastel-2", "pastel-3",
    "pixel", "style-01", "style-02", "style-03", "style-04", "style-05", "style-06", "style-07", "w", "w-",
]  # fmt: skip


def test_list_matches_todays_semantics_on_every_page(adapter_store, template, registry_tiny_spec, tmp_path):
    seed_names(adapter_store, dataclasses.replace(template, tags=()), MIXED_NAMES[::2])
    seed_names(adapter_store, template, MIXED_NAMES[1::2])  # tagged "art"
    seed_names(adapter_store, dataclasses.replace(template, tags=()), ["pastel-1"], versions=(2,))  # latest untagged
    deleted = {"ink-wash", "pastel-3", "style-07", "w-"}  # w- is the last name
    for name in deleted:
        tombstone(adapter_store, name)
    tombstone(adapter_store, "pixel", 1)
    seed_names(adapter_store, template, ["pixel"], versions=(2,))  # live at version 2 only, tagged
    reg = node(adapter_store, registry_tiny_spec, tmp_path)
    live = {name: reg.resolve(name) for name in sorted(set(MIXED_NAMES + ["seed"]) - deleted)}
    assert [(e.name, e.latest, e.versions) for e in reg.list(limit=1000)[0]] == [
        (name, m, (2,) if name == "pixel" else (1, 2) if name == "pastel-1" else (1,)) for name, m in live.items()
    ]

    for tag in (None, "art"):
        for limit in (1, 2, 3, 7):
            for after in [None, *sorted(set(MIXED_NAMES + ["seed", "a", "ink-", "zz"]))]:
                page, cursor = reg.list(tag=tag, limit=limit, after=after)
                assert ([e.name for e in page], cursor) == reference_page(live, tag, limit, after), (tag, limit, after)
    # Paging through: every live name once, in order; a tag across pages.
    assert all_pages(reg, limit=3)[0] == sorted(live)
    assert all_pages(reg, limit=2, tag="art")[0] == sorted(n for n, m in live.items() if "art" in m.tags)


def test_list_page_boundaries_cursor_and_deleted_names(adapter_registry, registry_tiny_spec):
    reg = adapter_registry
    data = small_lora_bytes(registry_tiny_spec)
    for name in ["a", "b", "c", "d"]:
        reg.register(data, name=name)
    names = lambda page: ([e.name for e in page[0]], page[1])  # noqa: E731
    assert [names(reg.list(limit=1, after=n)) for n in "abc"] == [(["b"], "b"), (["c"], "c"), (["d"], None)]
    assert names(reg.list(limit=3)) == (["a", "b", "c"], "c")
    assert names(reg.list(limit=4)) == (["a", "b", "c", "d"], None)  # full page, nothing after: no cursor
    assert reg.list(after="d") == ([], None)  # the cursor after the last name
    assert reg.list(after="zzz") == ([], None)
    reg.delete("d")
    assert names(reg.list(limit=3)) == (["a", "b", "c"], None)  # d deleted: nothing follows c
    reg.delete("b")
    assert names(reg.list(limit=1, after="a")) == (["c"], None)  # b skipped
    assert names(reg.list(limit=1)) == (["a"], "a")


def test_list_reads_only_its_page(adapter_store, template, registry_tiny_spec, tmp_path):
    names = [f"n{i:03d}" for i in range(200)]
    seed_names(adapter_store, template, names)
    counting = CountingStore(adapter_store)
    reg = node(counting, registry_tiny_spec, tmp_path)
    # Keys read: the cursor's own (if any), the page's, the live name proving the cursor, and the key
    # that shows that name's keys have ended (none after "seed", the last name).
    for after, expected, keys in [(None, names[:10], 12), ("n100", names[101:111], 13), ("n189", names[190:], 12)]:
        counting.reset()
        page, cursor = reg.list(limit=10, after=after)
        assert [e.name for e in page] == expected and cursor == expected[-1]  # "seed" follows n199
        assert counting.lists() == [("adapters/", listing_start(after))]
        assert counting.keys_read == keys
        gets = [c[1] for c in counting.calls if c[0] == "get_bytes"]
        assert sorted(gets) == [layout.manifest_key(n, 1) for n in expected]  # one manifest per listed name
    counting.reset()
    reg.list(limit=10, after="n100")  # manifests now cached: only the listing
    assert [c[0] for c in counting.calls] == ["list"]


def test_list_looks_up_a_name_hidden_behind_its_extensions(adapter_store, template, registry_tiny_spec, tmp_path):
    """``style`` lists after ``style-000``..``style-099`` in key order; the listing looks it up instead of
    reading all of them first."""
    names = [f"style-{i:03d}" for i in range(100)]
    seed_names(adapter_store, template, names + ["style"])
    counting = CountingStore(adapter_store)
    reg = node(counting, registry_tiny_spec, tmp_path)
    page, cursor = reg.list(limit=3, after="seed")
    assert ([e.name for e in page], cursor) == (["style", "style-000", "style-001"], "style-001")
    assert counting.lists() == [("adapters/", "adapters/seed"), ("adapters/style/", None)]
    # seed's key, the read-ahead (and the key that ends its last group), then style's own key: not all 100.
    assert counting.keys_read <= registry_module.LIST_READ_AHEAD_NAMES + 3
    assert all_pages(reg, limit=7)[0] == ["seed", "style", *names]


def test_list_bounds_what_one_call_examines(adapter_store, template, registry_tiny_spec, tmp_path):
    names = [f"n{i:02d}" for i in range(30)]
    seed_names(adapter_store, dataclasses.replace(template, tags=()), names)
    for name in names[:20]:
        tombstone(adapter_store, name)
    seed_names(adapter_store, template, ["n25"], versions=(2,))  # the only "art" name besides "seed"
    counting = CountingStore(adapter_store)
    reg = node(counting, registry_tiny_spec, tmp_path, list_scan_names=5)
    page, cursor = reg.list(limit=2)
    assert ([e.name for e in page], cursor) == ([], "n06")  # 7 names examined, all deleted: a short page
    page, cursor = reg.list(limit=2, after="n06")
    assert ([e.name for e in page], cursor) == ([], "n13")
    assert all_pages(reg, limit=2) == (names[20:] + ["seed"], [0, 0, 1, 2, 2, 2, 2, 2])
    # A rare tag: the filter reads on call after call, each bounded, and finds the same names.
    assert all_pages(reg, limit=2, tag="art") == (["n25", "seed"], [0, 0, 0, 1, 1])
    unbounded = node(adapter_store, registry_tiny_spec, tmp_path, "unbounded")
    assert [e.name for e in unbounded.list(limit=2, tag="art")[0]] == ["n25", "seed"]


def test_list_pages_are_kept_for_the_ttl_and_dropped_by_own_writes(
    adapter_store, template, registry_tiny_spec, tmp_path
):
    seed_names(adapter_store, template, ["a", "b", "c"])
    now = [1000.0]
    counting = CountingStore(adapter_store)
    reg = node(counting, registry_tiny_spec, tmp_path, manifest_ttl_s=5.0, clock=lambda: now[0])
    first = reg.list(limit=2)
    counting.reset()
    now[0] += 4.9
    assert reg.list(limit=2) == first and counting.calls == []  # fresh: no store call
    assert reg.resolve("b") == first[0][1].latest and counting.calls == []  # the listing answered for b too
    reg.delete("a")
    assert [e.name for e in reg.list(limit=2)[0]] == ["b", "c"]  # gone from this node's listing at once
    counting.reset()
    now[0] += 5.0
    assert [e.name for e in reg.list(limit=2)[0]] == ["b", "c"] and counting.lists() == [("adapters/", None)]


# -- the request path lists one name's prefix ----------------------------------------------------


def test_request_path_lists_only_the_names_prefix(adapter_store, template, registry_tiny_spec, tmp_path):
    names = [f"style-{i:03d}" for i in range(300)]
    seed_names(adapter_store, template, names)
    seed_names(adapter_store, template, ["style-042"], versions=(2,))
    now = [1000.0]
    counting = CountingStore(adapter_store)
    replica = node(counting, registry_tiny_spec, tmp_path, "replica", manifest_ttl_s=5.0, clock=lambda: now[0])

    assert replica.resolve("style-042").ref == "style-042@2"
    assert replica.resolve("style-007@1").ref == "style-007@1"
    assert replica.load("style-123")[0].ref == "style-123@1"
    assert replica.fetch("style-200@1")[0].ref == "style-200@1"
    assert [m.ref for m in replica.versions("style-042")] == ["style-042@1", "style-042@2"]
    assert counting.lists() == [
        (layout.name_prefix(n), None) for n in ["style-042", "style-007", "style-123", "style-200"]
    ]
    blob = layout.blob_key(template.sha256)
    assert [c for c in counting.calls if c[0] != "list"] == [
        ("get_bytes", layout.manifest_key("style-042", 2)),
        ("get_bytes", layout.manifest_key("style-007", 1)),
        ("get_bytes", layout.manifest_key("style-123", 1)),
        ("download", blob),  # once: style-200 has the same weights, now in the disk cache
        ("get_bytes", layout.manifest_key("style-200", 1)),
        ("get_bytes", layout.manifest_key("style-042", 1)),
    ]

    # Within manifest_ttl_s the caches answer: no store call at all.
    counting.reset()
    now[0] += 4.9
    for ref in ["style-042", "style-007@1", "style-123", "style-200@1"]:
        replica.load(ref)
    assert counting.calls == []
    # After it, one listing of the name's own prefix each; the manifests are still cached (immutable).
    now[0] += 0.1
    replica.resolve("style-042")
    replica.load("style-123@1")
    assert counting.calls == [
        ("list", layout.name_prefix("style-042"), None),
        ("list", layout.name_prefix("style-123"), None),
    ]


def test_registration_lists_only_the_names_prefix(adapter_store, template, registry_tiny_spec, tmp_path):
    seed_names(adapter_store, template, [f"n{i:03d}" for i in range(100)])
    counting = CountingStore(adapter_store)
    reg = node(counting, registry_tiny_spec, tmp_path)
    assert reg.register(small_lora_bytes(registry_tiny_spec, seed=1), name="n050").ref == "n050@2"
    assert counting.lists() == [(layout.name_prefix("n050"), None)]


def test_group_by_name_skips_foreign_keys():
    objects = [
        ObjectInfo(key, 1, 0.0)
        for key in [
            "adapters/a/00000001.deleted",
            "adapters/a/00000001.json",
            "adapters/a/00000002.json",
            "adapters/a/README",
            "adapters/b/00000003.json",
        ]
    ]
    assert list(group_by_name(objects)) == [("a", {1: True, 2: False}), ("b", {3: False})]
