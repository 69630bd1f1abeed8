"""Drain and undrain (SPEC §1.3, §9) through a real RegistryServer.

DRAINING is not routable (Resolve, the gateway's RegistryResolver), still checked
(last_check_at and last_error move, the status does not), never reaped (past its
lease, past deregister_after), its heartbeats acknowledged, so a self-registering
plugin keeps its id. Undrain puts it back: HEALTHY when its last check passed, else
UNKNOWN and checked at once. Each drain is one revision that watchers see; a drain
that changes nothing makes none.

Real registries on 127.0.0.1:0 over SQLite under tmp_path (PostgreSQL for the
replica test), real plugins (FakePlugin, PluginHost); every wait is on a condition
with a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from trust_helpers import Who, write_policy
from watch_helpers import WatchRecorder

from ingestor import RegistryResolver
from registry.client import RegistryClient
from registry.errors import InvalidArgument, NotFound, PermissionDenied
from registry.sdk import PluginHost
from registry.server import RegistryServer
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb

DEADLINE = 15.0  # a bound on a failure, never a measure
UNKNOWN_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # well-formed, never issued
DEAD = "127.0.0.1:9"  # nothing answers there: its checks fail
CODE = grpc.StatusCode
DRAINING, HEALTHY = pb.PLUGIN_STATUS_DRAINING, pb.PLUGIN_STATUS_HEALTHY
UNKNOWN, UNHEALTHY, EXPIRED = (
    pb.PLUGIN_STATUS_UNKNOWN,
    pb.PLUGIN_STATUS_UNHEALTHY,
    pb.PLUGIN_STATUS_EXPIRED,
)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """Checks every 0.2 s, so "still checked" shows within a deadline."""
    async with running_registry(tmp_path, health_interval=0.2) as server:
        yield server


@pytest.fixture
async def client(registry: RegistryServer) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry.address) as registry_client:
        yield registry_client


async def plugin_of(client: RegistryClient, plugin_id: str) -> pb.RegisteredPlugin:
    return await client.get_plugin(plugin_id)


async def wait_status(
    client: RegistryClient, plugin_id: str, status: pb.PluginStatus
) -> pb.RegisteredPlugin:
    async def probe() -> pb.RegisteredPlugin | None:
        plugin = await client.get_plugin(plugin_id)
        return plugin if plugin.status == status else None

    found: pb.RegisteredPlugin = await eventually(
        probe, within=DEADLINE, what=f"{plugin_id} {pb.PluginStatus.Name(status)}"
    )
    return found


async def resolved(client: RegistryClient, source: str) -> set[str]:
    return {e.plugin_id for e in (await client.resolve(source=source)).endpoints}


def checked_at(plugin: pb.RegisteredPlugin) -> datetime:
    return plugin.last_check_at.ToDatetime()


# -- by id: the whole cycle ----------------------------------------------------------------


async def test_drain_by_id_keeps_the_id_out_of_routing_until_undrained(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with (
        FakePlugin(name="lines", sources=["lines"]) as plugin,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        registered = await client.register(plugin.info(), plugin.address, lease_ttl_seconds=30)
        plugin_id = registered.plugin_id
        await wait_status(client, plugin_id, HEALTHY)
        assert await resolved(client, "lines") == {plugin_id}

        drained = await client.drain(plugin_id=plugin_id)
        assert [(p.plugin_id, p.status) for p in drained.plugins] == [(plugin_id, DRAINING)]
        assert drained.plugins[0].revision == drained.revision
        assert (await plugin_of(client, plugin_id)).status == DRAINING
        assert await resolved(client, "lines") == set()
        listed = await client.list_plugins(statuses=[pb.PLUGIN_STATUS_DRAINING])
        assert [p.plugin_id for p in listed] == [plugin_id]
        assert await client.heartbeat(plugin_id)  # acknowledged: no re-registration

        # Still checked: the check time moves, the status stays.
        before, calls = checked_at(await plugin_of(client, plugin_id)), plugin.health_calls
        await eventually(lambda: plugin.health_calls >= calls + 2, within=DEADLINE)
        now = await plugin_of(client, plugin_id)
        assert now.status == DRAINING
        assert checked_at(now) > before

        # Idempotent: no revision, nothing for watchers.
        again = await client.drain(plugin_id=plugin_id)
        assert again.revision == drained.revision == registry.state.view.revision
        assert [p.status for p in again.plugins] == [DRAINING]

        back = await client.drain(plugin_id=plugin_id, undrain=True)
        assert [(p.plugin_id, p.status) for p in back.plugins] == [(plugin_id, HEALTHY)]
        assert back.revision == drained.revision + 1
        assert await resolved(client, "lines") == {plugin_id}
        assert (await client.drain(plugin_id=plugin_id, undrain=True)).revision == back.revision

        await watch.wait(lambda: (back.revision, HEALTHY) in watch.history(plugin_id))
        assert watch.history(plugin_id)[-2:] == [
            (drained.revision, DRAINING),
            (back.revision, HEALTHY),
        ]
        assert (await client.list_plugins(name="lines"))[0].plugin_id == plugin_id


# -- by name: every instance in one revision, the gateway's view ---------------------------


async def test_drain_by_name_takes_every_instance_out_of_the_gateways_view(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with (
        FakePlugin(name="multi", sources=["multi"]) as one,
        FakePlugin(name="multi", sources=["multi"]) as two,
        FakePlugin(name="multi", sources=["multi"]) as later,
        WatchRecorder(client, within=DEADLINE) as watch,
        RegistryResolver(registry.address) as resolver,
    ):
        ids = sorted(
            [
                (await client.register(p.info(), p.address, lease_ttl_seconds=30)).plugin_id
                for p in (one, two)
            ]
        )
        for plugin_id in ids:
            await wait_status(client, plugin_id, HEALTHY)
        await resolver.wait_for_async(lambda v: len(v.endpoints("multi")) == 2, DEADLINE)

        drained = await client.drain(name="multi")
        assert sorted(p.plugin_id for p in drained.plugins) == ids
        assert {(p.status, p.revision) for p in drained.plugins} == {(DRAINING, drained.revision)}
        await watch.wait(lambda: bool(watch.at(drained.revision)))
        (change,) = watch.at(drained.revision)  # one change with every instance drained
        assert sorted(p.plugin_id for p in change.upserted) == ids

        view = await resolver.wait_for_async(
            lambda v: all(
                i in v.plugins and v.plugins[i].status == pb.PLUGIN_STATUS_DRAINING for i in ids
            ),
            DEADLINE,
        )
        assert view.endpoints("multi") == ()
        assert view.declares("multi")  # registered, just not routable
        assert await resolved(client, "multi") == set()

        # An instance registered after the drain is not drained.
        fresh = (await client.register(later.info(), later.address, lease_ttl_seconds=30)).plugin_id
        await wait_status(client, fresh, HEALTHY)
        await resolver.wait_for_async(
            lambda v: [e.plugin_id for e in v.endpoints("multi")] == [fresh], DEADLINE
        )

        back = await client.drain(name="multi", undrain=True)
        statuses = {p.plugin_id: (p.status, p.revision) for p in back.plugins}
        assert statuses == {
            **dict.fromkeys(ids, (HEALTHY, back.revision)),
            fresh: (HEALTHY, statuses[fresh][1]),
        }
        assert statuses[fresh][1] < back.revision  # it was not part of the change
        await resolver.wait_for_async(lambda v: len(v.endpoints("multi")) == 3, DEADLINE)
        assert await resolved(client, "multi") == {*ids, fresh}


# -- checks while drained -------------------------------------------------------------------


async def test_checks_of_a_drained_plugin_are_recorded_but_never_move_it(
    tmp_path: Path,
) -> None:
    async with (
        running_registry(tmp_path, health_interval=0.1, unhealthy_threshold=2) as server,
        RegistryClient(server.address) as client,
        FakePlugin(name="flaky", sources=["flaky"]) as plugin,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        plugin_id = (await client.register(plugin.info(), plugin.address)).plugin_id
        await wait_status(client, plugin_id, HEALTHY)
        drained = await client.drain(plugin_id=plugin_id)

        plugin.healthy, plugin.health_message = False, "disk full"
        calls = plugin.health_calls

        async def failing_checks_seen() -> pb.RegisteredPlugin | None:
            found = await client.get_plugin(plugin_id)
            # Well past the threshold of 2 failures.
            failed = found.last_error == "disk full" and plugin.health_calls > calls + 4
            return found if failed else None

        seen = await eventually(failing_checks_seen, within=DEADLINE, what="failing checks")
        assert seen.status == DRAINING
        assert [s for r, s in watch.history(plugin_id) if r > drained.revision] == []

        # Its last check failed: back as UNKNOWN, then the checker's word.
        back = await client.drain(plugin_id=plugin_id, undrain=True)
        assert [p.status for p in back.plugins] == [UNKNOWN]
        await wait_status(client, plugin_id, UNHEALTHY)
        assert await resolved(client, "flaky") == set()


async def test_an_undrained_plugin_whose_last_check_failed_is_checked_at_once(
    tmp_path: Path,
) -> None:
    """With an hour between checks, only the check an undrain asks for can make it HEALTHY."""
    async with (
        running_registry(tmp_path, health_interval=3600.0) as server,
        RegistryClient(server.address) as client,
        FakePlugin(name="late", sources=["late"], healthy=False) as plugin,
    ):
        plugin_id = (await client.register(plugin.info(), plugin.address)).plugin_id

        async def first_check_failed() -> bool:
            found = await client.get_plugin(plugin_id)
            return found.last_error == "plugin reports unhealthy"

        await eventually(first_check_failed, within=DEADLINE, what="the first check")
        assert (await plugin_of(client, plugin_id)).status == UNKNOWN  # one failure of three
        await client.drain(plugin_id=plugin_id)
        plugin.healthy = True
        calls = plugin.health_calls

        back = await client.drain(plugin_id=plugin_id, undrain=True)
        assert [p.status for p in back.plugins] == [UNKNOWN]
        await wait_status(client, plugin_id, HEALTHY)
        assert plugin.health_calls == calls + 1
        assert await resolved(client, "late") == {plugin_id}


# -- leases ---------------------------------------------------------------------------------


async def test_a_drained_plugin_outlives_its_lease_and_deregister_after(tmp_path: Path) -> None:
    settings: dict[str, Any] = {
        "health_interval": 3600.0,
        "deregister_after": 0.5,
        "reap_interval": 0.1,
    }
    async with (
        running_registry(tmp_path, **settings) as server,
        RegistryClient(server.address) as client,
    ):
        info = pb.PluginInfo(name="held", type=pb.PLUGIN_TYPE_INGESTOR, sources=["held"])
        held = (await client.register(info, DEAD, lease_ttl_seconds=1)).plugin_id
        await client.drain(plugin_id=held)
        # Registered after it with the same lease, and never renewed either: once the
        # reaper has removed it, it has swept past the drained one's deadline too.
        info = pb.PluginInfo(name="control", type=pb.PLUGIN_TYPE_INGESTOR, sources=["control"])
        control = (await client.register(info, DEAD, lease_ttl_seconds=1)).plugin_id

        async def control_removed() -> bool:
            return not await client.list_plugins(name="control")

        await eventually(control_removed, within=DEADLINE, what="the control reaped")
        with pytest.raises(NotFound):
            await client.get_plugin(control)
        assert (await plugin_of(client, held)).status == DRAINING
        assert await client.heartbeat(held)  # past its lease, still acknowledged

        # Undrained, its lease counts again: it lapses and the reaper removes it.
        await client.drain(plugin_id=held, undrain=True)

        async def held_removed() -> bool:
            return not await client.list_plugins(name="held")

        await eventually(held_removed, within=DEADLINE, what="the undrained plugin reaped")


async def test_a_drain_survives_a_restart(tmp_path: Path) -> None:
    info = pb.PluginInfo(name="kept", type=pb.PLUGIN_TYPE_INGESTOR, sources=["kept"])
    async with (
        running_registry(tmp_path, health_interval=3600.0) as server,
        RegistryClient(server.address) as client,
    ):
        plugin_id = (await client.register(info, DEAD, no_lease=True)).plugin_id
        revision = (await client.drain(name="kept")).revision
    async with (
        running_registry(tmp_path, health_interval=3600.0) as server,
        RegistryClient(server.address) as client,
    ):
        plugin = await client.get_plugin(plugin_id)
        assert (plugin.status, plugin.revision) == (DRAINING, revision)


# -- a self-registering SDK plugin ----------------------------------------------------------


async def test_a_drained_sdk_plugin_keeps_its_id_and_hears_of_it(
    registry: RegistryServer, client: RegistryClient
) -> None:
    heard: list[bool] = []
    async with PluginHost(
        {"name": "sdk-lines", "sources": ["sdk-lines"]},
        ingest=lambda request: [],
        registry=registry.address,
        lease_ttl_seconds=1,
        on_drain=heard.append,
    ) as host:
        plugin_id = await host.wait_registered()
        await wait_status(client, plugin_id, HEALTHY)
        assert not host.drained

        drained = await client.drain(name="sdk-lines")
        assert [p.plugin_id for p in drained.plugins] == [plugin_id]
        await eventually(lambda: host.drained, within=DEADLINE, what="the host to see it")
        assert heard == [True]

        # Heartbeats go on past two leases, acknowledged: the same id, no new instance.
        since = drained.plugins[0].last_heartbeat_at.ToDatetime()

        async def renewed_past_the_lease() -> bool:
            plugin = await client.get_plugin(plugin_id)
            return (plugin.last_heartbeat_at.ToDatetime() - since).total_seconds() > 2

        await eventually(renewed_past_the_lease, within=DEADLINE, what="heartbeats")
        assert host.plugin_id == plugin_id
        listed = await client.list_plugins(name="sdk-lines")
        assert [(p.plugin_id, p.status) for p in listed] == [(plugin_id, DRAINING)]
        assert await resolved(client, "sdk-lines") == set()

        await client.drain(plugin_id=plugin_id, undrain=True)
        await eventually(lambda: not host.drained, within=DEADLINE, what="the host to see it")
        assert heard == [True, False]
        assert await resolved(client, "sdk-lines") == {plugin_id}
        assert host.plugin_id == plugin_id


# -- who may drain, and bad requests --------------------------------------------------------


A = Who("team-a", ("register", "read"), names=("team-a-*",))
B = Who("team-b", ("register", "read"), names=("*",))
ADMIN = Who("admin", ("admin",))


async def test_only_the_owner_or_an_admin_drains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.audit")
    policy = write_policy(tmp_path / "policy.toml", [A, B, ADMIN])
    async with (
        running_registry(tmp_path, auth_policy=str(policy), health_interval=3600.0) as server,
        RegistryClient(server.address, token=A.token) as a,
        RegistryClient(server.address, token=B.token) as b,
        RegistryClient(server.address, token=ADMIN.token) as admin,
    ):
        info = pb.PluginInfo(name="team-a-x", type=pb.PLUGIN_TYPE_INGESTOR, sources=["ax"])
        plugin_id = (await a.register(info, DEAD, no_lease=True)).plugin_id
        for call in (b.drain(plugin_id=plugin_id), b.drain(name="team-a-x")):
            with pytest.raises(PermissionDenied) as refused:
                await call
            text = str(refused.value)
            assert "team-a-x" in text, text
            assert plugin_id not in text, text  # the name only, never the id
            assert DEAD not in text, text  # nor the address
        assert (await a.get_plugin(plugin_id)).status == UNKNOWN

        drained = await a.drain(name="team-a-x")
        assert [p.status for p in drained.plugins] == [DRAINING]
        with pytest.raises(PermissionDenied):
            await b.drain(plugin_id=plugin_id, undrain=True)
        assert (await a.get_plugin(plugin_id)).status == DRAINING
        back = await admin.drain(plugin_id=plugin_id, undrain=True)
        assert [p.status for p in back.plugins] == [UNKNOWN]

    lines = [r.getMessage() for r in caplog.records if r.name == "registry.audit"]
    drains = [line for line in lines if line.startswith(("drain ", "undrain "))]
    assert len(drains) == 2, lines
    assert drains[0].startswith("drain principal=team-a ")
    assert f"id={plugin_id} revision={drained.revision}" in drains[0]
    assert drains[1].startswith("undrain principal=admin ")
    assert f"revision={back.revision}" in drains[1]
    assert all("name=team-a-x" in line for line in drains)


async def test_unknown_targets_are_not_found_and_bad_requests_invalid(
    registry: RegistryServer, client: RegistryClient
) -> None:
    stub = client.stub
    cases = [
        (pb.DrainRequest(plugin_id=UNKNOWN_ID), CODE.NOT_FOUND, "plugin_id"),
        (pb.DrainRequest(name="nobody", undrain=True), CODE.NOT_FOUND, "name"),
        (pb.DrainRequest(), CODE.INVALID_ARGUMENT, "target"),
        (pb.DrainRequest(undrain=True), CODE.INVALID_ARGUMENT, "target"),
        (pb.DrainRequest(plugin_id=""), CODE.INVALID_ARGUMENT, "plugin_id"),
        (pb.DrainRequest(plugin_id="x" * 1000), CODE.INVALID_ARGUMENT, "plugin_id"),
        (pb.DrainRequest(name=""), CODE.INVALID_ARGUMENT, "name"),
        (pb.DrainRequest(name="no spaces"), CODE.INVALID_ARGUMENT, "name"),
    ]
    wrong = []
    for request, code, field in cases:
        try:
            await stub.Drain(request, timeout=DEADLINE)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() != code or not details.startswith(f"{field}: "):
                wrong.append(f"{request}: {exc.code().name} {details!r}")
        else:
            wrong.append(f"{request}: OK")
    assert not wrong, "\n".join(wrong)
    with pytest.raises(NotFound):
        await client.drain(plugin_id=UNKNOWN_ID)
    with pytest.raises(InvalidArgument):
        await client.drain()  # neither
    with pytest.raises(InvalidArgument):
        await client.drain(plugin_id=UNKNOWN_ID, name="both")
    assert registry.state.view.revision == 0  # nothing was written


async def test_an_expired_instance_is_not_brought_back_by_a_drain(tmp_path: Path) -> None:
    async with (
        running_registry(tmp_path, health_interval=3600.0, reap_interval=0.1) as server,
        RegistryClient(server.address) as client,
    ):
        info = pb.PluginInfo(name="lapsed", type=pb.PLUGIN_TYPE_INGESTOR, sources=["lapsed"])
        plugin_id = (await client.register(info, DEAD, lease_ttl_seconds=1)).plugin_id
        expired = await wait_status(client, plugin_id, EXPIRED)
        answer = await client.drain(name="lapsed")
        assert [(p.plugin_id, p.status) for p in answer.plugins] == [(plugin_id, EXPIRED)]
        assert answer.revision == expired.revision  # nothing changed
        assert not await client.heartbeat(plugin_id)


# -- replicas: a drain through a follower is the leader's -----------------------------------


@pytest.mark.postgres
async def test_a_drain_through_a_follower_is_forwarded_to_the_leader(
    pg_url: str, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {
        "database_url": pg_url,
        "leader_lease": 2.0,
        "health_interval": 3600.0,
    }
    async with running_registry(tmp_path, **settings) as leader:
        assert leader.replication is not None
        assert leader.replication.leading
        async with (
            running_registry(tmp_path, **settings) as follower,
            RegistryClient(follower.address) as client,
        ):
            assert follower.replication is not None
            assert not follower.replication.leading
            info = pb.PluginInfo(name="far", type=pb.PLUGIN_TYPE_INGESTOR, sources=["far"])
            plugin_id = (await client.register(info, DEAD, no_lease=True)).plugin_id

            drained = await client.drain(name="far")
            assert [(p.plugin_id, p.status) for p in drained.plugins] == [(plugin_id, DRAINING)]
            held = leader.state.catalog.get(plugin_id)
            assert held is not None
            assert int(held.status) == DRAINING
            # Answered once the follower's own catalogue holds it: read your write here.
            assert (await client.get_plugin(plugin_id)).status == DRAINING
            assert follower.state.view.revision >= drained.revision

            with pytest.raises(NotFound):
                await client.drain(plugin_id=UNKNOWN_ID)
            back = await client.drain(plugin_id=plugin_id, undrain=True)
            assert back.revision == drained.revision + 1
            assert (await client.get_plugin(plugin_id)).status == UNKNOWN
