"""The Denoiser's request router: ranks replicas by the adapters they really hold (unit tests, no Ray cluster)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deployments.messages import AdapterUse, DenoiseParams
from deployments.routing import AdapterAffinityRouter, rank_replicas, request_adapters, routing_stats


def replica(name: str, adapters=(), free_slots=4):
    return SimpleNamespace(replica_id=name, routing_stats=routing_stats(adapters, capacity=free_slots, pinned=0))


def params(*refs: str) -> DenoiseParams:
    adapters = tuple(AdapterUse(ref, 1.0) for ref in refs)
    return DenoiseParams(1, 0, 64, 64, 4, 7.5, "default", adapters=adapters)


def pending(*refs: str, as_kwarg: bool = False):
    p = params(*refs)
    return (
        SimpleNamespace(args=["embeddings"], kwargs={"params": p})
        if as_kwarg
        else SimpleNamespace(args=["embeddings", p, None], kwargs={})
    )


def names(ranks) -> list[list[str]]:
    return [sorted(r.replica_id for r in rank) for rank in ranks]


def test_routing_stats_report_resident_adapters_and_slots_that_could_be_freed():
    assert routing_stats({"b@1": 2, "a@3": 1}, capacity=8, pinned=3) == {"adapters": ["a@3", "b@1"], "free_slots": 5}
    assert routing_stats([], capacity=2, pinned=5)["free_slots"] == 0


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_request_adapters_come_from_the_denoise_params(as_kwarg):
    assert request_adapters(pending("a@1", "b@2", as_kwarg=as_kwarg)) == ("a@1", "b@2")
    assert request_adapters(pending()) == ()
    assert request_adapters(None) == ()
    assert request_adapters(SimpleNamespace(args=["x"], kwargs={})) == ()


@pytest.mark.parametrize(
    "wanted, expected",
    [
        # no adapters: one rank, every replica
        ((), [["r1", "r2", "r3", "r4"]]),
        # holders first, then replicas with spare slots, then full ones
        (("a@1",), [["r1", "r3"], ["r2"], ["r4"]]),
        # a replica holding both adapters of a composed request ranks above one holding one
        (("a@1", "b@1"), [["r3"], ["r1"], ["r2"], ["r4"]]),
        # nobody holds it: spare slots first
        (("z@9",), [["r1", "r2", "r3"], ["r4"]]),
    ],
)
def test_rank_replicas(wanted, expected):
    replicas = [
        replica("r1", ["a@1"]),
        replica("r2", []),
        replica("r3", ["a@1", "b@1"]),
        replica("r4", ["c@1"], free_slots=0),
    ]
    assert names(rank_replicas(replicas, wanted, recent={})) == expected


def test_a_replica_just_sent_an_adapter_counts_as_holding_it_until_it_reports():
    replicas = [replica("r1"), replica("r2")]
    assert names(rank_replicas(replicas, ("a@1",), recent={"r2": {"a@1"}})) == [["r2"], ["r1"]]


def test_the_router_remembers_where_it_sent_each_adapter_for_a_while(monkeypatch):
    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)  # no Serve machinery: the policy only
    router.initialize_state(affinity_ttl_s=3.0, sample=8)
    now = [100.0]
    monkeypatch.setattr("deployments.routing.time.monotonic", lambda: now[0])
    replicas = [replica("r1"), replica("r2"), replica("r3")]
    router.on_request_routed(pending("a@1"), "r2", result=None)
    ranks = asyncio.run(router.choose_replicas(replicas, pending("a@1")))
    assert names(ranks) == [["r2"], ["r1", "r3"]]
    now[0] += 3.0  # the memory lapses: the replica's own report is the truth from here on
    ranks = asyncio.run(router.choose_replicas(replicas, pending("a@1")))
    assert names(ranks) == [["r1", "r2", "r3"]]
    router.on_request_routed(pending("b@1"), "r1", result=None)
    router._routed.pop("r1")  # as on_replica_actor_died does
    assert router._recent() == {}


def test_each_rank_is_sampled_power_of_two_choices():
    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)
    router.initialize_state(sample=2)
    replicas = [replica(f"r{i}", ["a@1"] if i < 5 else []) for i in range(8)]
    ranks = asyncio.run(router.choose_replicas(replicas, pending("a@1")))
    assert [len(rank) for rank in ranks] == [2, 2]
    assert {r.replica_id for r in ranks[0]} <= {"r0", "r1", "r2", "r3", "r4"}
