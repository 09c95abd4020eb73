"""Route a Denoiser request to a replica that already holds its adapters, by real residency.

Serve's public request-router API (``ray.serve.request_router``): each Denoiser replica reports,
through ``record_routing_stats``, the adapters its slots really hold (``AdapterSlots``, every
adapter of every request, not one "model id" per request) and how many slots it could still
give up. ``AdapterAffinityRouter`` ranks replicas for a request by how many of its adapters each
already holds, then by spare slots, and Serve picks the least-loaded replica that accepts the
request in the first rank that has one. So:

- repeated requests for an adapter go where it is resident, and stop causing loads;
- when those replicas are full (``max_ongoing_requests``), the request goes to another replica,
  which loads the adapter too: a hot adapter spreads instead of piling onto one replica;
- a request composing several adapters prefers a replica holding all of them.

Residency reports arrive every ``ROUTING_STATS_PERIOD_S``. In between, the router remembers where
it has just sent each adapter (that replica is loading it) for ``affinity_ttl_s``, so a burst for
a new adapter does not scatter before the first report. No private Serve internals are used.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .messages import DenoiseParams

ROUTING_STATS_PERIOD_S = 1.0


def routing_stats(resident: Iterable[str], capacity: int, pinned: int) -> dict:
    """What a Denoiser replica reports: the adapters in its slots and the slots it could free."""
    return {"adapters": sorted(resident), "free_slots": max(0, capacity - pinned)}


def request_adapters(pending: PendingRequest | None) -> tuple[str, ...]:
    """The adapter refs of a Denoiser call: those of the ``DenoiseParams`` among its arguments."""
    if pending is None:
        return ()
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, DenoiseParams):
            return tuple(a.ref for a in arg.adapters)
    return ()


def rank_replicas(
    replicas: Sequence[RunningReplica],
    wanted: Sequence[str],
    recent: dict[ReplicaID, set[str]],
) -> list[list[RunningReplica]]:
    """Replicas in ranks, best first: most of ``wanted`` held (reported or just routed there), then
    those with spare slots, then the rest. Without ``wanted``, one rank of everything."""
    if not wanted:
        return [list(replicas)] if replicas else []
    by_held: dict[int, list[RunningReplica]] = {}
    spare, rest = [], []
    for r in replicas:
        stats = r.routing_stats or {}
        held = set(stats.get("adapters", ())) | recent.get(r.replica_id, set())
        n = sum(1 for ref in wanted if ref in held)
        if n:
            by_held.setdefault(n, []).append(r)
        elif stats.get("free_slots", 1) > 0:
            spare.append(r)
        else:
            rest.append(r)
    ranks = [by_held[n] for n in sorted(by_held, reverse=True)]
    return [rank for rank in (*ranks, spare, rest) if rank]


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    """Serve's request router for the Denoiser (``deployments/routing.py`` explains the policy)."""

    def initialize_state(self, affinity_ttl_s: float = 3 * ROUTING_STATS_PERIOD_S, sample: int = 2, **kwargs):
        self.affinity_ttl_s = affinity_ttl_s
        self.sample = sample  # replicas probed per rank (power of two choices)
        self._routed: dict[ReplicaID, dict[str, float]] = {}  # replica -> adapter -> when routed there

    def _recent(self) -> dict[ReplicaID, set[str]]:
        now = time.monotonic()
        out = {}
        for replica_id, refs in self._routed.items():
            live = {ref for ref, at in refs.items() if now - at < self.affinity_ttl_s}
            if live:
                out[replica_id] = live
        return out

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not hasattr(self, "_routed"):
            self.initialize_state()
        ranks = rank_replicas(candidate_replicas, request_adapters(pending_request), self._recent())
        return [random.sample(rank, min(self.sample, len(rank))) for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        refs = request_adapters(pending_request)
        if refs:
            now = time.monotonic()
            self._routed.setdefault(replica_id, {}).update({ref: now for ref in refs})

    def on_replica_actor_died(self, replica_id: ReplicaID):
        self._routed.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)
