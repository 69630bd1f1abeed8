"""KeepAlive (SPEC §1.3) through a real RegistryServer: one stream renews many leases.

One answer per request, in order; each request is checked as a Heartbeat is (the id's
syntax, the caller's right to the instance); the end of a stream health-checks the
plugins it renewed at once. Raw stubs, so each status code is the server's own;
real registries on 127.0.0.1:0 over SQLite under tmp_path (PostgreSQL for the
follower); every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from trust_helpers import Who, write_policy

from registry.client import RegistryClient
from registry.keepalive import MAX_STREAM_IDS
from registry.server import RegistryServer
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb, pb_grpc

DEADLINE = 15.0  # a bound on a failure, never a measure
UNKNOWN_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # well-formed, never issued
CODE = grpc.StatusCode
ALICE = Who("alice", ("register", "read"))
BOB = Who("bob", ("register", "read"))


def renewal(plugin_id: str) -> pb.KeepAliveRequest:
    return pb.KeepAliveRequest(plugin_id=plugin_id)


async def answers_of(call: Any) -> list[Any]:
    """Every answer of a stream, to its end (raising its error, if it ends in one)."""
    return [answer async for answer in call]


async def register(client: RegistryClient, plugin: FakePlugin, *, ttl: int = 0) -> str:
    response = await client.register(plugin.info(), plugin.address, lease_ttl_seconds=ttl)
    return response.plugin_id


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """Leases reaped every 0.1 s; checks only at registration (the interval is an hour),
    so any later Health call is the one a broken stream asked for."""
    async with running_registry(tmp_path, health_interval=3600.0, reap_interval=0.1) as server:
        yield server


@pytest.fixture
async def stub(registry: RegistryServer) -> AsyncIterator[pb_grpc.PluginRegistryStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield pb_grpc.PluginRegistryStub(channel)


@pytest.fixture
async def client(registry: RegistryServer) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry.address) as registry_client:
        yield registry_client


async def test_a_stream_alone_keeps_a_lease_alive_past_several_ttls(
    client: RegistryClient, stub: pb_grpc.PluginRegistryStub
) -> None:
    async with (
        FakePlugin(name="kept", sources=["kept"]) as kept,
        FakePlugin(name="left", sources=["left"]) as left,
    ):
        kept_id = await register(client, kept, ttl=1)
        left_id = await register(client, left, ttl=1)
        call = stub.KeepAlive()
        answers: list[pb.KeepAliveResponse] = []

        async def renew_forever() -> None:
            while True:
                await call.write(renewal(kept_id))
                answers.append(await call.read())
                await asyncio.sleep(0.25)  # a plugin's renewal period, not a synchronisation

        renewing = asyncio.create_task(renew_forever())
        try:
            # The other lease, never renewed, runs out: leases are being enforced.
            await eventually(
                lambda: _status(client, left_id, pb.PLUGIN_STATUS_EXPIRED),
                within=DEADLINE,
                what="the lease nobody renews to expire",
            )

            # Renewed over the stream alone, the first outlives three of its TTLs.
            async def three_ttls_renewed() -> bool:
                plugin = await client.get_plugin(kept_id)
                assert plugin.status != pb.PLUGIN_STATUS_EXPIRED
                lived = plugin.last_heartbeat_at.ToDatetime() - plugin.registered_at.ToDatetime()
                return lived.total_seconds() > 3

            await eventually(three_ttls_renewed, within=DEADLINE, what="three TTLs of renewals")
        finally:
            renewing.cancel()
            call.cancel()
        assert answers
        assert all(
            (a.plugin_id, a.acknowledged, a.lease_ttl_seconds) == (kept_id, True, 1)
            for a in answers
        )


async def _status(client: RegistryClient, plugin_id: str, status: pb.PluginStatus) -> bool:
    return (await client.get_plugin(plugin_id)).status == status


async def test_one_answer_per_request_in_order_unknown_ids_not_acknowledged(
    client: RegistryClient, stub: pb_grpc.PluginRegistryStub
) -> None:
    async with FakePlugin(name="a", sources=["a"]) as a, FakePlugin(name="b", sources=["b"]) as b:
        a_id, b_id = await register(client, a), await register(client, b)
        sent = [a_id, UNKNOWN_ID, b_id, a_id]
        call = stub.KeepAlive(iter(renewal(i) for i in sent))
        answers = [(r.plugin_id, r.acknowledged) async for r in call]
        assert await call.code() == CODE.OK
    assert answers == [(a_id, True), (UNKNOWN_ID, False), (b_id, True), (a_id, True)]


@pytest.mark.parametrize(
    ("plugin_id", "reason"),
    [("", "is required"), ("bad\nid", "control characters"), ("x" * 65, "the limit is 64")],
)
async def test_a_malformed_id_ends_the_stream_invalid_argument_naming_the_field(
    stub: pb_grpc.PluginRegistryStub, plugin_id: str, reason: str
) -> None:
    answers: list[pb.KeepAliveResponse] = []

    async def collect() -> None:
        async for answer in stub.KeepAlive(iter([renewal(UNKNOWN_ID), renewal(plugin_id)])):
            answers.append(answer)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect()
    assert [a.acknowledged for a in answers] == [False]  # the well-formed unknown one
    assert caught.value.code() == CODE.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("plugin_id: ")
    assert reason in details


async def test_an_undecodable_request_is_invalid_argument(registry: RegistryServer) -> None:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        raw = channel.stream_stream("/polku.v1.PluginRegistry/KeepAlive")
        call = raw(iter([b"\x0a\x02\xff\xfe"]))  # plugin_id with bad UTF-8
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answers_of(call)
    assert caught.value.code() == CODE.INVALID_ARGUMENT
    assert "cannot be decoded as polku.v1.KeepAliveRequest" in (caught.value.details() or "")


@pytest.mark.parametrize("how", ["cancelled", "connection lost", "half-closed"])
async def test_the_end_of_a_stream_checks_its_plugins_at_once(
    registry: RegistryServer, client: RegistryClient, how: str
) -> None:
    async with FakePlugin(name="beat", sources=["beat"]) as plugin:
        plugin_id = await register(client, plugin)
        await eventually(
            lambda: _status(client, plugin_id, pb.PLUGIN_STATUS_HEALTHY),
            within=DEADLINE,
            what="the first check",
        )
        channel = grpc.aio.insecure_channel(registry.address)
        try:
            call = pb_grpc.PluginRegistryStub(channel).KeepAlive()
            await call.write(renewal(plugin_id))
            assert (await call.read()).acknowledged
            checked = plugin.health_calls  # the next regular check is an hour away
            if how == "cancelled":
                call.cancel()
            elif how == "half-closed":
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
            else:
                await channel.close()
            await eventually(
                lambda: plugin.health_calls > checked,
                within=DEADLINE,
                what="a Health call after the stream ended",
            )
        finally:
            await channel.close()
        assert (await client.get_plugin(plugin_id)).status == pb.PLUGIN_STATUS_HEALTHY


def test_a_stream_remembers_a_bounded_number_of_ids() -> None:
    assert 0 < MAX_STREAM_IDS <= 4096


async def test_a_stream_counts_against_max_streams_and_as_heartbeats_in_metrics(
    tmp_path: Path,
) -> None:
    async with (
        running_registry(
            tmp_path, max_streams_per_principal=1, metrics_listen="127.0.0.1:0"
        ) as registry,
        RegistryClient(registry.address) as client,
        grpc.aio.insecure_channel(registry.address) as channel,
        FakePlugin(name="m", sources=["m"]) as plugin,
    ):
        plugin_id = await register(client, plugin)
        stub = pb_grpc.PluginRegistryStub(channel)
        first = stub.KeepAlive()
        await first.write(renewal(plugin_id))
        assert (await first.read()).acknowledged
        second = stub.KeepAlive(iter([renewal(plugin_id)]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answers_of(second)
        assert caught.value.code() == CODE.RESOURCE_EXHAUSTED
        assert (caught.value.details() or "").startswith("max_streams_per_principal")
        await first.write(renewal(UNKNOWN_ID))
        assert not (await first.read()).acknowledged
        await first.done_writing()
        assert await first.read() is grpc.aio.EOF
        metrics = registry.metrics
        assert metrics is not None

        def sample(name: str, **labels: str) -> float:
            value = metrics.registry.get_sample_value(name, labels)
            return value or 0.0

        await eventually(
            lambda: (
                sample(
                    "polku_registry_rpcs_total",
                    service="polku.v1.PluginRegistry",
                    method="KeepAlive",
                    code="OK",
                )
                == 1
            ),
            within=DEADLINE,
            what="the stream counted as one RPC",
        )
        assert sample("polku_registry_heartbeats_total", acknowledged="true") == 1
        assert sample("polku_registry_heartbeats_total", acknowledged="false") == 1


async def test_another_principals_instance_is_permission_denied(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.toml", [ALICE, BOB])
    async with (
        running_registry(tmp_path, auth_policy=str(policy), health_interval=3600.0) as registry,
        grpc.aio.insecure_channel(registry.address) as channel,
    ):
        stub = pb_grpc.PluginRegistryStub(channel)
        answer = await stub.Register(
            pb.RegisterRequest(
                info=pb.PluginInfo(name="alice-a", type=pb.PLUGIN_TYPE_INGESTOR, sources=["a"]),
                address="127.0.0.1:1",
            ),
            metadata=ALICE.bearer,
        )
        own = stub.KeepAlive(iter([renewal(answer.plugin_id)]), metadata=ALICE.bearer)
        assert [r.acknowledged async for r in own] == [True]
        foreign = stub.KeepAlive(iter([renewal(answer.plugin_id)]), metadata=BOB.bearer)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answers_of(foreign)
        assert caught.value.code() == CODE.PERMISSION_DENIED
        assert "alice-a" in (caught.value.details() or "")
        nobody = stub.KeepAlive(iter([renewal(answer.plugin_id)]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answers_of(nobody)
        assert caught.value.code() == CODE.UNAUTHENTICATED


async def test_a_client_that_sends_and_never_reads_stalls_its_own_stream(
    registry: RegistryServer, client: RegistryClient, stub: pb_grpc.PluginRegistryStub
) -> None:
    async with FakePlugin(name="flood", sources=["flood"]) as plugin:
        plugin_id = await register(client, plugin)
        call = stub.KeepAlive()
        sent = 0
        try:
            # Bounded in count and time: writes stop being taken once flow control
            # holds the answers nobody reads (and with them, the requests).
            async with asyncio.timeout(5.0):
                for sent in range(1, 200_001):  # noqa: B007
                    await call.write(renewal(plugin_id))
        except TimeoutError:
            pass
        finally:
            call.cancel()
        assert sent < 200_000, "the server kept taking requests nobody read the answers of"
        # The registry answers others meanwhile.
        assert (await client.get_plugin(plugin_id)).status == pb.PLUGIN_STATUS_HEALTHY


@pytest.mark.postgres
async def test_on_a_follower_a_stream_renews_as_its_heartbeat_does(
    pg_url: str, tmp_path: Path
) -> None:
    """Answered by the follower, renewed on the leader in its next batch; another
    principal's instance is PERMISSION_DENIED there too."""
    policy = write_policy(tmp_path / "policy.toml", [ALICE, BOB])
    settings: dict[str, Any] = {
        "database_url": pg_url,
        "auth_policy": str(policy),
        "cluster_token": "cluster-keepalive-test-token",
        "leader_lease": 2.0,
        "health_interval": 3600.0,
    }
    async with running_registry(tmp_path, **settings) as leader:
        assert leader.replication is not None
        assert leader.replication.leading
        async with (
            running_registry(tmp_path, **settings) as follower,
            grpc.aio.insecure_channel(follower.address) as channel,
        ):
            stub = pb_grpc.PluginRegistryStub(channel)
            answer = await stub.Register(
                pb.RegisterRequest(
                    info=pb.PluginInfo(
                        name="alice-f", type=pb.PLUGIN_TYPE_INGESTOR, sources=["alice-f"]
                    ),
                    address="127.0.0.1:1",
                    lease_ttl_seconds=30,
                ),
                metadata=ALICE.bearer,
            )
            plugin = leader.state.catalog.get(answer.plugin_id)
            assert plugin is not None
            before = plugin.last_heartbeat_at
            assert before is not None
            # Twice: the first may go to the leader (owner not learnt yet), the second
            # is answered here.
            call = stub.KeepAlive(
                iter([renewal(answer.plugin_id), renewal(answer.plugin_id)]),
                metadata=ALICE.bearer,
            )
            answers = await answers_of(call)
            assert [(a.plugin_id, a.acknowledged) for a in answers] == [
                (answer.plugin_id, True)
            ] * 2
            assert answers[-1].lease_ttl_seconds == 30

            def renewed_on_the_leader() -> bool:
                held = leader.state.catalog.get(answer.plugin_id)
                return held is not None and (held.last_heartbeat_at or before) > before

            await eventually(renewed_on_the_leader, within=DEADLINE, what="the leader's renewal")
            foreign = stub.KeepAlive(iter([renewal(answer.plugin_id)]), metadata=BOB.bearer)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await answers_of(foreign)
            assert caught.value.code() == CODE.PERMISSION_DENIED
