"""Two replicas in one process on one PostgreSQL database, under an auth policy:
writes through the follower are the leader's, with the caller's identity, and nobody
else can borrow that identity (SPEC §6, §8).

The first server started takes the free lease at once and leads; the second follows.
Calls go through raw stubs so each answer's status code is the server's own.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from sqlalchemy import text
from trust_helpers import Who, write_policy

from registry.model import Plugin
from registry.replica.forward import REVISION_KEY
from registry.server import RegistryServer
from registry.testing import eventually, running_registry
from registry.trust.auth import CLUSTER_TOKEN_KEY, FORWARDED_FOR_KEY
from registry.wire import pb, pb_grpc

DEADLINE = 10.0  # a bound on a wait, never a pause
LEASE = 2.0  # short, so a test never waits long on the lease; renewed every 2/3 s
CLUSTER_TOKEN = "cluster-" + secrets.token_hex(16)
ALICE = Who("alice", ("register", "read"))
BOB = Who("bob", ("register", "read"))
ADMIN = Who("admin", ("admin",))


@dataclass
class Pair:
    leader: RegistryServer
    follower: RegistryServer
    to_leader: pb_grpc.PluginRegistryStub
    to_follower: pb_grpc.PluginRegistryStub
    replica_of_leader: pb_grpc.RegistryReplicaStub


@pytest.fixture
async def pair(pg_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    policy = write_policy(tmp_path / "policy.toml", [ALICE, BOB, ADMIN])
    settings: dict[str, Any] = {
        "database_url": pg_url,
        "auth_policy": str(policy),
        "cluster_token": CLUSTER_TOKEN,
        "leader_lease": LEASE,
        "health_interval": 3600.0,  # no checks: nothing but the test writes revisions
    }
    async with running_registry(tmp_path, **settings) as leader:
        assert leader.replication is not None
        assert leader.replication.leading
        async with (
            running_registry(tmp_path, **settings) as follower,
            grpc.aio.insecure_channel(leader.address) as leader_channel,
            grpc.aio.insecure_channel(follower.address) as follower_channel,
        ):
            assert follower.replication is not None
            assert not follower.replication.leading
            yield Pair(
                leader,
                follower,
                pb_grpc.PluginRegistryStub(leader_channel),
                pb_grpc.PluginRegistryStub(follower_channel),
                pb_grpc.RegistryReplicaStub(leader_channel),
            )


def registration(name: str) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        info=pb.PluginInfo(
            name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[f"{name}-src"]
        ),
        address="127.0.0.1:1",
    )


def on_leader(pair: Pair, plugin_id: str) -> Plugin:
    """The plugin in the leader's catalogue (it must be there)."""
    plugin = pair.leader.state.catalog.get(plugin_id)
    assert plugin is not None, plugin_id
    return plugin


async def stored_names(server: RegistryServer) -> list[str]:
    """Plugin names in the database itself (not any replica's memory)."""
    store = server.state.store
    assert hasattr(store, "engine")
    async with store.engine.connect() as conn:
        return sorted((await conn.execute(text("SELECT name FROM plugins"))).scalars())


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


@pytest.mark.postgres
async def test_a_register_through_the_follower_is_the_leaders_owned_by_the_caller(
    pair: Pair,
) -> None:
    answer = await pair.to_follower.Register(registration("alice-a"), metadata=ALICE.bearer)
    assert answer.accepted
    plugin = pair.leader.state.catalog.get(answer.plugin_id)
    assert plugin is not None
    assert plugin.name == "alice-a"
    assert pair.leader.state.catalog.owner_of("alice-a") == "alice"
    owners = {o.name: o.principal for o in (await pair.leader.state.store.load()).owners}
    assert owners == {"alice-a": "alice"}
    assert await stored_names(pair.leader) == ["alice-a"]


@pytest.mark.postgres
async def test_the_follower_reads_its_own_write_at_once(pair: Pair) -> None:
    answer = await pair.to_follower.Register(registration("alice-b"), metadata=ALICE.bearer)
    # No wait: the follower answered Register only once its catalogue held the revision.
    got = await pair.to_follower.GetPlugin(
        pb.GetPluginRequest(plugin_id=answer.plugin_id), metadata=ALICE.bearer
    )
    assert got.plugin_id == answer.plugin_id
    assert got.info.name == "alice-b"
    assert pair.follower.state.view.revision >= got.revision


@pytest.mark.postgres
async def test_the_leader_names_the_revision_of_its_writes(pair: Pair) -> None:
    call = pair.to_leader.Register(registration("alice-r"), metadata=ALICE.bearer)
    answer = await call
    trailing = dict(await call.trailing_metadata() or ())
    assert trailing.get(REVISION_KEY) == str(on_leader(pair, answer.plugin_id).revision)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(((FORWARDED_FOR_KEY, "admin"),), id="no-token-no-identity"),
        pytest.param(((FORWARDED_FOR_KEY, "admin"), *ALICE.bearer), id="no-token-alice"),
        pytest.param(
            ((FORWARDED_FOR_KEY, "admin"), (CLUSTER_TOKEN_KEY, "not-the-cluster-token-at-all")),
            id="wrong-token",
        ),
        pytest.param(
            (
                (FORWARDED_FOR_KEY, "admin"),
                (CLUSTER_TOKEN_KEY, CLUSTER_TOKEN[:-1]),
                *ALICE.bearer,
            ),
            id="almost-the-token-alice",
        ),
    ],
)
async def test_a_forged_forwarded_identity_is_refused_and_registers_nothing(
    pair: Pair, metadata: tuple[tuple[str, str], ...]
) -> None:
    details = await refused(
        pair.to_leader.Register(registration("forged"), metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "cluster token" in details
    assert CLUSTER_TOKEN not in details
    assert all(p.name != "forged" for p in pair.leader.state.catalog)
    assert pair.leader.state.catalog.owner_of("forged") is None
    assert await stored_names(pair.leader) == []


@pytest.mark.postgres
async def test_the_cluster_token_is_what_makes_a_forwarded_identity_trusted(pair: Pair) -> None:
    """The control of the test above: the same header with the token is believed."""
    metadata = ((FORWARDED_FOR_KEY, "admin"), (CLUSTER_TOKEN_KEY, CLUSTER_TOKEN))
    answer = await pair.to_leader.Register(registration("forwarded"), metadata=metadata)
    assert answer.accepted
    assert pair.leader.state.catalog.owner_of("forwarded") == "admin"
    # A name the policy does not hold is refused even with the token.
    metadata = ((FORWARDED_FOR_KEY, "mallory"), (CLUSTER_TOKEN_KEY, CLUSTER_TOKEN))
    await refused(
        pair.to_leader.Register(registration("mallory-a"), metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert await stored_names(pair.leader) == ["forwarded"]


@pytest.mark.postgres
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="nothing"),
        pytest.param(ADMIN.bearer, id="admin-token-only"),
        pytest.param(((CLUSTER_TOKEN_KEY, "not-the-cluster-token-at-all"),), id="wrong-token"),
    ],
)
async def test_forwarded_heartbeats_need_the_cluster_token(
    pair: Pair, metadata: tuple[tuple[str, str], ...]
) -> None:
    answer = await pair.to_leader.Register(registration("alice-h"), metadata=ALICE.bearer)
    before = on_leader(pair, answer.plugin_id).last_heartbeat_at
    assert before is not None
    batch = pb.HeartbeatBatch(
        heartbeats=[pb.ForwardedHeartbeat(plugin_id=answer.plugin_id, principal="alice")]
    )
    details = await refused(
        pair.replica_of_leader.ForwardHeartbeats(batch, metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "cluster token" in details
    assert on_leader(pair, answer.plugin_id).last_heartbeat_at == before

    # The control: with the token the same batch renews the lease.
    result = await pair.replica_of_leader.ForwardHeartbeats(
        batch, metadata=((CLUSTER_TOKEN_KEY, CLUSTER_TOKEN),)
    )
    assert list(result.refused) == []
    after = on_leader(pair, answer.plugin_id).last_heartbeat_at
    assert after is not None
    assert after > before


@pytest.mark.postgres
async def test_a_heartbeat_through_the_follower_reaches_the_leader(pair: Pair) -> None:
    answer = await pair.to_follower.Register(registration("alice-beat"), metadata=ALICE.bearer)
    before = on_leader(pair, answer.plugin_id).last_heartbeat_at
    assert before is not None
    beat = await pair.to_follower.Heartbeat(
        pb.HeartbeatRequest(plugin_id=answer.plugin_id), metadata=ALICE.bearer
    )
    assert beat.acknowledged

    def renewed_on_the_leader() -> bool:
        plugin = pair.leader.state.catalog.get(answer.plugin_id)
        return (
            plugin is not None
            and plugin.last_heartbeat_at is not None
            and (plugin.last_heartbeat_at > before)
        )

    await eventually(renewed_on_the_leader, within=DEADLINE, what="the batch to reach the leader")
    assert pair.follower.replication is not None
    assert pair.follower.replication.link.refused == 0


@pytest.mark.postgres
async def test_unregister_through_the_follower_of_anothers_plugin_is_denied(pair: Pair) -> None:
    answer = await pair.to_follower.Register(registration("alice-u"), metadata=ALICE.bearer)
    details = await refused(
        pair.to_follower.Unregister(
            pb.UnregisterRequest(plugin_id=answer.plugin_id), metadata=BOB.bearer
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "alice-u" in details
    assert pair.leader.state.catalog.get(answer.plugin_id) is not None
    assert pair.follower.state.view.get(answer.plugin_id) is not None
    assert await stored_names(pair.leader) == ["alice-u"]

    # Its owner may, through the same replica.
    await pair.to_follower.Unregister(
        pb.UnregisterRequest(plugin_id=answer.plugin_id), metadata=ALICE.bearer
    )
    assert pair.follower.state.view.get(answer.plugin_id) is None
    assert await stored_names(pair.leader) == []


@pytest.mark.postgres
async def test_a_heartbeat_through_the_follower_of_anothers_plugin_is_denied(pair: Pair) -> None:
    answer = await pair.to_follower.Register(registration("alice-hb"), metadata=ALICE.bearer)
    await refused(
        pair.to_follower.Heartbeat(
            pb.HeartbeatRequest(plugin_id=answer.plugin_id), metadata=BOB.bearer
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


@pytest.mark.postgres
async def test_both_replicas_name_the_same_leader_and_epoch(pair: Pair) -> None:
    leader = await pair.to_leader.GetStatus(Empty(), metadata=ALICE.bearer)
    follower = await pair.to_follower.GetStatus(Empty(), metadata=ALICE.bearer)
    assert (leader.role, follower.role) == (pb.REPLICA_ROLE_LEADER, pb.REPLICA_ROLE_FOLLOWER)
    assert leader.leader == follower.leader == pair.leader.advertised
    assert leader.epoch == follower.epoch == 1
    assert leader.backend == follower.backend == "postgresql"
    assert (leader.address, follower.address) == (pair.leader.advertised, pair.follower.advertised)

    async def both_listed() -> bool:
        status = await pair.to_follower.GetStatus(Empty(), metadata=ALICE.bearer)
        roles = {r.address: r.role for r in status.replicas if r.up}
        return roles == {
            pair.leader.advertised: pb.REPLICA_ROLE_LEADER,
            pair.follower.advertised: pb.REPLICA_ROLE_FOLLOWER,
        }

    await eventually(both_listed, within=DEADLINE, what="both replicas' reports")


async def test_a_single_sqlite_registry_says_so(tmp_path: Path) -> None:
    async with (
        running_registry(tmp_path) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        status = await pb_grpc.PluginRegistryStub(channel).GetStatus(Empty())
    assert status.backend == "sqlite"
    assert status.role == pb.REPLICA_ROLE_LEADER
    assert status.leader == status.address == server.advertised
    assert [(r.address, r.role, r.up) for r in status.replicas] == [
        (server.advertised, pb.REPLICA_ROLE_LEADER, True)
    ]
