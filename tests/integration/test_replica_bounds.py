"""The bounds of a follower's replica state: heartbeat batches and the owners it learns."""

from __future__ import annotations

from collections import OrderedDict

import grpc

from registry.model import Principal
from registry.replica import forward, node
from registry.replica.forward import LeaderLink
from registry.replica.node import Replication
from registry.wire import pb, pb_grpc


class _Leader(pb_grpc.RegistryReplicaServicer):  # type: ignore[misc]
    """A leader's RegistryReplica side that renews everything and keeps the batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def ForwardHeartbeats(
        self, request: pb.HeartbeatBatch, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatBatchResult:
        self.batches.append(len(request.heartbeats))
        return pb.HeartbeatBatchResult()


async def test_a_heartbeat_batch_holds_at_most_max_batch_the_rest_goes_next() -> None:
    leader = _Leader()
    server = grpc.aio.server()
    pb_grpc.add_RegistryReplicaServicer_to_server(leader, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = LeaderLink(
        leader_address=lambda: f"127.0.0.1:{port}", cluster_token=None, credentials=None
    )
    try:
        for i in range(forward._MAX_BATCH + 7):
            link.heartbeat(f"plugin-{i}", None)
        await link.flush()
        assert leader.batches == [forward._MAX_BATCH]
        await link.flush()
        assert leader.batches == [forward._MAX_BATCH, 7]
        assert link.take_heartbeats() == []
    finally:
        await link.stop()
        await server.stop(None)


def test_a_follower_remembers_at_most_max_owners(monkeypatch) -> None:
    monkeypatch.setattr(node, "MAX_OWNERS", 3)
    follower = Replication.__new__(Replication)  # only the owner cache is exercised
    follower._owners = OrderedDict()
    alice = Principal(name="alice", scopes=frozenset({"register"}), names=("*",))
    for name in ("a", "b", "c", "d"):
        follower.learn_owner(name, alice)
    assert list(follower._owners) == ["b", "c", "d"]  # the least recently confirmed went
    assert follower.may_renew(alice, "d")
    assert not follower.may_renew(alice, "a")  # forgotten: the leader is asked again
