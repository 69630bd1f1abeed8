"""SPEC §9 Metrics: ``/metrics`` over HTTP, each family moving with the event it counts.

A real registry with ``metrics_listen`` on 127.0.0.1:0, a real FakePlugin it checks,
real RPCs; every scrape is a real HTTP GET (urllib, in a thread) parsed with
prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from trust_helpers import Who, write_policy

from registry import RegistryClient
from registry.errors import NotFound, RegistryError, Unauthenticated
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"  # well formed, never registered

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text: str = answer.read().decode()
        return text


async def scrape_text(server: RegistryServer) -> str:
    return await asyncio.to_thread(_get, server.metrics_port)


async def scrape(server: RegistryServer) -> Samples:
    """Every sample of ``/metrics``, by name and labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(await scrape_text(server)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(server: RegistryServer, what: str, check: object) -> Samples:
    """Scrape until ``check(samples)`` holds; the samples that satisfied it."""

    async def probe() -> Samples | None:
        samples = await scrape(server)
        return samples if check(samples) else None  # type: ignore[operator]

    result: Samples = await eventually(probe, within=10, what=what, interval=0.05)
    return result


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with running_registry(
        tmp_path,
        metrics_listen="127.0.0.1:0",
        health_interval=0.1,
        health_timeout=1.0,
        unhealthy_threshold=1,
        healthy_threshold=1,
    ) as registry:
        yield registry


@pytest.fixture
async def client(server: RegistryServer) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(server.address) as registry_client:
        yield registry_client


@pytest.fixture
async def plugin() -> AsyncIterator[FakePlugin]:
    async with FakePlugin(name="secret-name", sources=["secret-source"]) as fake:
        yield fake


async def test_served_over_http_with_every_family(server: RegistryServer) -> None:
    assert server.metrics_port > 0
    assert server.metrics is not None
    names = {family.name for family in text_string_to_metric_families(await scrape_text(server))}
    for family in (
        "plugins",
        "registrations",
        "removals",
        "heartbeats",
        "status_changes",
        "health_check_duration_seconds",
        "watchers",
        "watch_messages",
        "commit_duration_seconds",
        "commit_batch_size",
        "revision",
        "leader",
        "leader_epoch",
        "rpcs",
        "rpc_duration_seconds",
    ):
        assert f"polku_registry_{family}" in names, family
    samples = await scrape(server)
    assert value(samples, "polku_registry_leader") == 1
    assert value(samples, "polku_registry_leader_epoch") == 0
    assert value(samples, "polku_registry_watchers") == 0
    # Each status and type is a series from the start, at 0.
    assert ("polku_registry_plugins", frozenset({("status", "healthy"), ("type", "emitter")})) in (
        samples
    )


async def test_register_and_status_change(
    server: RegistryServer, client: RegistryClient, plugin: FakePlugin
) -> None:
    before = await scrape(server)
    assert value(before, "polku_registry_registrations_total") == 0
    registered = await client.register(plugin.info(), plugin.address)

    samples = await until(
        server,
        "the plugin HEALTHY in the metrics",
        lambda s: value(s, "polku_registry_plugins", status="healthy", type="ingestor") == 1,
    )
    assert value(samples, "polku_registry_registrations_total") == 1
    # Registered HEALTHY (its first check folded in): no status change, one commit.
    assert (
        value(samples, "polku_registry_status_changes_total", **{"from": "unknown"}, to="healthy")
        == 0
    )
    assert value(samples, "polku_registry_plugins", status="unknown", type="ingestor") == 0
    assert value(samples, "polku_registry_revision") >= 1 > value(before, "polku_registry_revision")
    assert (
        value(samples, "polku_registry_health_check_duration_seconds_count", result="healthy") >= 1
    )
    assert value(samples, "polku_registry_commit_duration_seconds_count") >= 1
    assert value(samples, "polku_registry_commit_batch_size_sum") >= 1
    assert (
        value(
            samples,
            "polku_registry_rpcs_total",
            service="polku.v1.PluginRegistry",
            method="Register",
            code="OK",
        )
        == 1
    )

    # The plugin fails its checks: HEALTHY → UNHEALTHY, counted as such.
    plugin.healthy = False
    samples = await until(
        server,
        "the plugin UNHEALTHY in the metrics",
        lambda s: value(s, "polku_registry_plugins", status="unhealthy", type="ingestor") == 1,
    )
    assert (
        value(samples, "polku_registry_status_changes_total", **{"from": "healthy"}, to="unhealthy")
        == 1
    )
    assert value(samples, "polku_registry_plugins", status="healthy", type="ingestor") == 0
    assert (
        value(samples, "polku_registry_health_check_duration_seconds_count", result="unhealthy")
        >= 1
    )

    # Removed: the removal counts by its last status; the gauge is back to none.
    await client.unregister(registered.plugin_id)
    samples = await until(
        server,
        "the removal in the metrics",
        lambda s: value(s, "polku_registry_removals_total", status="unhealthy") == 1,
    )
    assert sum(v for (name, _), v in samples.items() if name == "polku_registry_plugins") == 0
    assert value(samples, "polku_registry_registrations_total") == 1

    # Only counts: no plugin name, source, id or address in any label.
    text = await scrape_text(server)
    for secret in ("secret-name", "secret-source", registered.plugin_id, plugin.address):
        assert secret not in text


async def test_a_dead_plugin_fails_its_checks(
    server: RegistryServer, client: RegistryClient, plugin: FakePlugin
) -> None:
    await client.register(plugin.info(), plugin.address)
    await until(
        server,
        "a healthy check",
        lambda s: value(s, "polku_registry_health_check_duration_seconds_count", result="healthy"),
    )
    await plugin.stop()
    await until(
        server,
        "a failed check",
        lambda s: value(s, "polku_registry_health_check_duration_seconds_count", result="failed"),
    )


async def test_heartbeats_acknowledged_or_not(
    server: RegistryServer, client: RegistryClient, plugin: FakePlugin
) -> None:
    registered = await client.register(plugin.info(), plugin.address)
    assert await client.heartbeat(registered.plugin_id) is True
    assert await client.heartbeat(registered.plugin_id) is True
    assert await client.heartbeat(UNKNOWN_ID) is False
    samples = await scrape(server)
    assert value(samples, "polku_registry_heartbeats_total", acknowledged="true") == 2
    assert value(samples, "polku_registry_heartbeats_total", acknowledged="false") == 1


async def test_watchers_and_watch_messages(
    server: RegistryServer, client: RegistryClient, plugin: FakePlugin
) -> None:
    before = await scrape(server)
    stream = client.watch()
    first = await anext(stream)
    assert first.snapshot
    samples = await until(server, "one watcher", lambda s: value(s, "polku_registry_watchers") == 1)
    sent = value(samples, "polku_registry_watch_messages_total")
    assert sent >= 1 > value(before, "polku_registry_watch_messages_total")

    await client.register(plugin.info(), plugin.address)
    change = await anext(stream)
    while not change.upserted:  # a progress message may come first
        change = await anext(stream)
    samples = await until(
        server,
        "the change's message counted",
        lambda s: value(s, "polku_registry_watch_messages_total") > sent,
    )
    assert value(samples, "polku_registry_watchers") == 1

    await stream.aclose()
    samples = await until(server, "no watcher", lambda s: value(s, "polku_registry_watchers") == 0)
    watch_calls = [
        labels
        for (name, labels), count in samples.items()
        if name == "polku_registry_rpcs_total" and ("method", "Watch") in labels and count
    ]
    assert watch_calls == [
        frozenset(
            {("service", "polku.v1.PluginRegistry"), ("method", "Watch"), ("code", "CANCELLED")}
        )
    ]


async def test_rpc_errors_by_code(server: RegistryServer, client: RegistryClient) -> None:
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.stub.Resolve(pb.ResolveRequest())  # no target
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotFound):
        await client.get_plugin(UNKNOWN_ID)
    samples = await scrape(server)
    assert (
        value(
            samples,
            "polku_registry_rpcs_total",
            service="polku.v1.PluginRegistry",
            method="GetPlugin",
            code="NOT_FOUND",
        )
        == 1
    )
    labels = {"service": "polku.v1.PluginRegistry", "method": "Resolve"}
    assert value(samples, "polku_registry_rpcs_total", **labels, code="INVALID_ARGUMENT") == 2
    assert value(samples, "polku_registry_rpcs_total", **labels, code="OK") == 0
    assert value(samples, "polku_registry_rpc_duration_seconds_count", **labels) == 2


async def test_refused_port_names_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = RegistryServer(
            RegistrySettings(
                listen="127.0.0.1:0",
                database_url=f"sqlite:///{tmp_path / 'registry.db'}",
                metrics_listen=address,
            )
        )
        with pytest.raises(RegistryError, match=f"cannot serve metrics on {address}"):
            await server.start()
        await server.stop()  # idempotent after the failed start
    # Nothing was left holding the database: another registry starts on it.
    async with running_registry(tmp_path) as again:
        assert again.metrics is None
        assert again.metrics_port == 0


async def test_stop_closes_the_endpoint(tmp_path: Path) -> None:
    async with running_registry(tmp_path, metrics_listen="127.0.0.1:0") as registry:
        port = registry.metrics_port
        assert await scrape_text(registry)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, port)


def test_settings_refuse_a_bad_address() -> None:
    for bad in ("nowhere", "127.0.0.1:http", "127.0.0.1:70000", "unix:/tmp/x"):
        with pytest.raises(ValueError, match="metrics_listen"):
            RegistrySettings(listen="127.0.0.1:0", database_url="sqlite://", metrics_listen=bad)
    every = RegistrySettings(listen="127.0.0.1:0", database_url="sqlite://", metrics_listen=":9")
    assert every.metrics_listen == ":9"
    assert RegistrySettings(metrics_listen="[::1]:0").metrics_listen == "[::1]:0"


async def test_calls_the_trust_interceptor_refuses_are_counted(tmp_path: Path) -> None:
    reader = Who("reader", ("read",))
    policy = write_policy(tmp_path / "policy.toml", [reader])
    async with running_registry(
        tmp_path, metrics_listen="127.0.0.1:0", auth_policy=str(policy)
    ) as registry:
        async with RegistryClient(registry.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_plugins()
        async with RegistryClient(registry.address, token=reader.token) as client:
            await client.list_plugins()
        samples = await scrape(registry)
        text = await scrape_text(registry)
    labels = {"service": "polku.v1.PluginRegistry", "method": "ListPlugins"}
    assert value(samples, "polku_registry_rpcs_total", **labels, code="UNAUTHENTICATED") == 1
    assert value(samples, "polku_registry_rpcs_total", **labels, code="OK") == 1
    assert reader.token not in text
    assert "reader" not in text  # no principal names either


async def test_replicas_count_their_own_view_and_role(pg_url: str, tmp_path: Path) -> None:
    settings = {
        "database_url": pg_url,
        "metrics_listen": "127.0.0.1:0",
        "health_interval": 3600.0,  # no checks: nothing but the test writes revisions
        "leader_lease": 2.0,
    }
    early = pb.PluginInfo(name="early", type=pb.PLUGIN_TYPE_INGESTOR, sources=["early"])
    late = pb.PluginInfo(name="late", type=pb.PLUGIN_TYPE_EMITTER)
    async with running_registry(tmp_path, **settings) as leader:
        async with RegistryClient(leader.address) as client:
            await client.register(early, "127.0.0.1:1")
        async with (
            running_registry(tmp_path, **settings) as follower,
            RegistryClient(leader.address) as client,
        ):
            # The follower's catalogue was loaded at its start: counted at once.
            samples = await scrape(follower)
            assert value(samples, "polku_registry_leader") == 0
            assert value(samples, "polku_registry_plugins", status="unknown", type="ingestor") == 1
            assert value(samples, "polku_registry_registrations_total") == 0
            leading = await scrape(leader)
            assert value(leading, "polku_registry_leader") == 1
            assert value(leading, "polku_registry_leader_epoch") >= 1
            # A later change reaches the follower through its pump: counted there too.
            await client.register(late, "127.0.0.1:2")
            samples = await until(
                follower,
                "the later registration on the follower",
                lambda s: value(s, "polku_registry_registrations_total") == 1,
            )
            assert value(samples, "polku_registry_plugins", status="unknown", type="emitter") == 1
            assert value(samples, "polku_registry_revision") == value(
                await scrape(leader), "polku_registry_revision"
            )
