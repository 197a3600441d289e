"""Prefix-affinity routing on Ray Serve's own request-router API (`ray.serve.request_router.RequestRouter`).

Requests to the engine deployment carry `blocks=` (affinity.py: chained hashes of the prompt's token blocks,
computed in the ingress, which has the tokenizer). `choose_replicas` ranks the replicas: first the one that
holds the longest prefix of the prompt (or the prompt's rendezvous replica when none does), then all the
others. Serve takes the first rank whose replica is below its `max_ongoing_requests`, and among the others
the least loaded: a saturated replica spills to the least-loaded one. `on_request_routed` records where each
prompt went (after any spill), so a conversation's next turn follows its prefix.

Requests without `blocks` (`describe`) are left to Serve's choice among all replicas.
"""
from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .affinity import PrefixTable


def _uid(replica: RunningReplica | ReplicaID) -> str:
    rid = replica.replica_id if isinstance(replica, RunningReplica) else replica
    return rid.unique_id


class PrefixAffinityRouter(RequestRouter):
    """Prefix-aware, spill-to-least-loaded routing (see the module docstring)."""

    def initialize_state(self, capacity: int = 100_000, **kwargs: Any) -> None:
        self.table = PrefixTable(capacity)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs: dict[str, Any] = {}
        if pending_request is not None:
            kwargs = pending_request.kwargs
            # every call offers all the replicas it would take: when none has room, Serve is to wait (back off)
            # before asking again, or its routing loop spins (Serve's own routers set this flag the same way)
            pending_request.routing_context.should_backoff = True
        blocks = kwargs.get("blocks")
        if not blocks:
            return [candidate_replicas]
        by_id = {_uid(r): r for r in candidate_replicas}
        first = self.table.preferred(blocks, list(by_id))
        rest = [r for r in candidate_replicas if _uid(r) != first]
        return [[by_id[first]], rest] if first is not None else [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        blocks = pending_request.kwargs.get("blocks")
        if blocks:
            self.table.record(_uid(replica_id), blocks)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(_uid(replica_id))
