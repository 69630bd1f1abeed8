"""SPEC §8: a write forwarded to the leader ends with an answer, whatever happens to the
channel it went on (the leader moves, a heartbeat batch fails, the link stops).

The leaders here are fake (real gRPC servers in this process, whose Unregister waits
until the test lets it answer), so a forwarded call is held in flight while the
follower gives its channel up. Before the fix, giving a channel up cancelled the calls
on it: the follower's handler raised ``CancelledError``, which gRPC takes for the
client's own cancellation, so the client heard nothing until its deadline.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from registry.errors import RegistryUnavailable
from registry.replica.election import LEADER_NOTICE
from registry.replica.forward import LeaderLink
from registry.storage.store import CHANGES_CHANNEL
from registry.wire import pb, pb_grpc

from .cluster import Cluster, describe_status
from .common import DEADLINE, rpc_error, until
from .conftest import MakeCluster

PLUGIN_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"


@dataclass
class FakeLeader:
    """A leader whose Unregister answers only once ``release`` is set."""

    server: grpc.aio.Server
    address: str
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    on_unregister: Callable[[], None] = lambda: None


class _Registry(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    def __init__(self, fake: Callable[[], FakeLeader]) -> None:
        self._fake = fake

    async def Unregister(
        self, request: pb.UnregisterRequest, context: grpc.aio.ServicerContext
    ) -> Empty:
        fake = self._fake()
        fake.on_unregister()
        fake.arrived.set()
        await fake.release.wait()
        return Empty()


class _Replica(pb_grpc.RegistryReplicaServicer):  # type: ignore[misc]
    async def ForwardHeartbeats(
        self, request: pb.HeartbeatBatch, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatBatchResult:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "batches do not arrive here")
        raise AssertionError("unreachable")


@pytest.fixture
async def fake_leaders() -> AsyncIterator[Callable[[], asyncio.Future[FakeLeader]]]:
    """``await start()``: a new fake leader on 127.0.0.1:0; all stopped after the test."""
    started: list[FakeLeader] = []

    async def start() -> FakeLeader:
        server = grpc.aio.server()
        fake: list[FakeLeader] = []
        pb_grpc.add_PluginRegistryServicer_to_server(_Registry(lambda: fake[0]), server)
        pb_grpc.add_RegistryReplicaServicer_to_server(_Replica(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        fake.append(FakeLeader(server, f"127.0.0.1:{port}"))
        started.append(fake[0])
        return fake[0]

    yield start  # type: ignore[misc]
    for fake in started:
        fake.release.set()
        await fake.server.stop(None)


def _link(address: Callable[[], str | None]) -> LeaderLink:
    return LeaderLink(leader_address=address, cluster_token=None, credentials=None)


def _unregister(link: LeaderLink) -> asyncio.Task[tuple[object, int]]:
    request = pb.UnregisterRequest(plugin_id=PLUGIN_ID)
    return asyncio.create_task(link.forward("Unregister", request, None, "test"))


async def test_a_forwarded_write_outlives_a_heartbeat_batch_that_did_not_arrive(
    fake_leaders: Callable[[], asyncio.Future[FakeLeader]],
) -> None:
    leader = await fake_leaders()
    link = _link(lambda: leader.address)
    try:
        forwarded = _unregister(link)
        await asyncio.wait_for(leader.arrived.wait(), DEADLINE)
        link.heartbeat("some-plugin", None)
        with pytest.raises(RegistryUnavailable):
            await link.flush()  # refused: the link gives this channel up
        leader.release.set()
        response, revision = await asyncio.wait_for(forwarded, DEADLINE)
        assert response == Empty()
        assert revision == 0
    finally:
        await link.stop()


async def test_a_forwarded_write_outlives_a_change_of_leader(
    fake_leaders: Callable[[], asyncio.Future[FakeLeader]],
) -> None:
    old, new = await fake_leaders(), await fake_leaders()
    new.release.set()
    current = [old.address]
    link = _link(lambda: current[0])
    try:
        forwarded = _unregister(link)
        await asyncio.wait_for(old.arrived.wait(), DEADLINE)
        current[0] = new.address
        await asyncio.wait_for(_unregister(link), DEADLINE)  # on a channel to the new one
        old.release.set()
        response, _ = await asyncio.wait_for(forwarded, DEADLINE)
        assert response == Empty()
    finally:
        await link.stop()


async def test_a_forwarded_write_cut_off_by_stop_is_unavailable_not_cancelled(
    fake_leaders: Callable[[], asyncio.Future[FakeLeader]],
) -> None:
    leader = await fake_leaders()
    link = _link(lambda: leader.address)
    forwarded = _unregister(link)
    await asyncio.wait_for(leader.arrived.wait(), DEADLINE)
    await link.stop()
    with pytest.raises(RegistryUnavailable):
        await asyncio.wait_for(forwarded, DEADLINE)


# -- a real replica following fake leaders ------------------------------------------------


async def _lead_as(database_url: str, address: str, *, notify: bool) -> None:
    """Give the lease row to a fake holder at ``address`` for an hour, epoch raised."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(
            "UPDATE registry_leader SET holder = $1, address = $2, epoch = epoch + 1, "
            "expires_at = clock_timestamp() + interval '1 hour' WHERE id = 1",
            "fake-" + secrets.token_hex(4),
            address,
        )
        if notify:
            await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, LEADER_NOTICE)
    finally:
        await conn.close()


async def _follows(cluster: Cluster, replica: str, leader: str) -> None:
    last: list[pb.RegistryStatus | str] = ["nothing yet"]

    async def following() -> bool:
        status = last[0] = await cluster.status(replica)
        return (
            not isinstance(status, str)
            and status.role == pb.REPLICA_ROLE_FOLLOWER
            and status.leader == leader
        )

    await until(
        following,
        what=lambda: f"{replica} to follow {leader}; it says {describe_status(last[0])}",
    )


@pytest.mark.postgres
async def test_an_unregister_in_flight_when_the_leader_moves_is_answered(
    make_cluster: MakeCluster, fake_leaders: Callable[[], asyncio.Future[FakeLeader]]
) -> None:
    """The follower forwards an Unregister to leader A, then learns that B leads and
    sends the next write there: the first one still gets A's answer, not silence."""
    cluster = await make_cluster(n=1)
    (replica,) = cluster.addresses
    old, new = await fake_leaders(), await fake_leaders()
    new.on_unregister = old.release.set  # A answers once a write reached B
    new.release.set()
    await _lead_as(cluster.database_url, old.address, notify=False)
    await _follows(cluster, replica, old.address)

    stub = cluster.client(replica).stub
    request = pb.UnregisterRequest(plugin_id=PLUGIN_ID)

    async def unregister() -> Empty:
        answer: Empty = await stub.Unregister(request, timeout=DEADLINE)
        return answer

    first = asyncio.create_task(unregister())
    await until(old.arrived.is_set, what=f"the Unregister forwarded to {old.address}")
    await _lead_as(cluster.database_url, new.address, notify=True)
    await _follows(cluster, replica, new.address)
    try:
        await stub.Unregister(request, timeout=DEADLINE)  # forwarded to B: A's channel goes
    except grpc.aio.AioRpcError as exc:
        raise AssertionError(f"the Unregister through B: {rpc_error(exc)}") from exc

    try:
        await first
    except grpc.aio.AioRpcError as exc:
        raise AssertionError(
            f"the Unregister in flight to A when B took over: {rpc_error(exc)} "
            "(want A's answer: its channel must not be cut under the call)"
        ) from exc
