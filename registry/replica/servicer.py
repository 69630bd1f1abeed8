"""The leader's side of ``polku.v1.RegistryReplica``: heartbeat batches from followers.

Each heartbeat renews a lease as if its plugin had sent it here, under the same
rule (the principal the follower verified must be allowed to act on the
instance); the ids not renewed go back, so the follower can count them.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from registry.state import RegistryState
from registry.trust.policy import AuthPolicy
from registry.wire import pb, pb_grpc

NOT_LEADER = "this replica is not the leader; send heartbeats to the current one"


class ReplicaServicer(pb_grpc.RegistryReplicaServicer):  # type: ignore[misc]
    def __init__(
        self,
        state: RegistryState,
        policy: Callable[[], AuthPolicy | None],
        leading: Callable[[], bool],
    ) -> None:
        self._state = state
        self._policy = policy
        self._leading = leading

    async def ForwardHeartbeats(
        self, request: pb.HeartbeatBatch, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatBatchResult:
        if not self._leading():
            await context.abort(grpc.StatusCode.UNAVAILABLE, NOT_LEADER)
        policy = self._policy()
        catalog = self._state.catalog
        refused = []
        for heartbeat in request.heartbeats:
            plugin = catalog.get(heartbeat.plugin_id)
            principal = policy.principal_named(heartbeat.principal) if policy else None
            allowed = plugin is not None and (
                policy is None
                or (principal is not None and catalog.may_act_on(principal, plugin.name))
            )
            if not allowed or self._state.heartbeat(heartbeat.plugin_id) is None:
                refused.append(heartbeat.plugin_id)
        return pb.HeartbeatBatchResult(refused=refused)
