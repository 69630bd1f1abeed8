"""Hub.emit: events routed by ``route_to`` to emitters, static and discovered; and a
replica SIGKILLed in the middle of a run of emits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from emit_sinks import FAST, EmitterHosts, Sink
from prometheus_client import CollectorRegistry

from ingestor import (
    EmitResult,
    ExternalEmitter,
    Hub,
    PluginEmitError,
    PluginError,
    RegistryResolver,
    RetryPolicy,
)
from registry.client import RegistryClient
from registry.sdk import PluginHost
from registry.server import RegistryServer
from registry.testing import eventually
from registry.wire import event_pb, pb

PLUGIN = Path(__file__).with_name("emitter_plugin.py")


def event(id: str, *route_to: str) -> event_pb.Event:
    return event_pb.Event(id=id, source="test", route_to=list(route_to))


@pytest.fixture
async def hosts(registry: RegistryServer) -> AsyncIterator[Callable[[str, Sink], PluginHost]]:
    made = EmitterHosts(registry.address)
    yield lambda name, sink: made.make(sink, name)
    await made.stop()


async def test_events_go_to_the_emitters_their_route_to_names_and_the_rest_are_dropped(
    registry: RegistryServer, hosts
) -> None:
    audit, metrics_sink = Sink(), Sink()
    for name, sink in (("audit", audit), ("metrics", metrics_sink)):
        await hosts(name, sink).start()
    gateway = CollectorRegistry()
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(
            lambda v: bool(v.emitter_endpoints("audit") and v.emitter_endpoints("metrics")), 10
        )
        async with Hub(resolver=resolver, retry=FAST, metrics=gateway).build() as hub:
            assert hub.emitters() == {"audit", "metrics"}
            result = await hub.emit_async(
                [
                    event("only-audit", "audit"),
                    event("both", "audit", "metrics"),
                    event("everyone"),  # no route_to: every emitter
                    event("nobody", "nope"),  # names no emitter: dropped
                    event("known-and-unknown", "nope", "metrics"),
                ]
            )
            assert isinstance(result, EmitResult)
            assert result.ok
            assert result.delivered == {"audit": 3, "metrics": 3}
            assert (result.dropped, result.dropped_event_ids) == (1, ("nobody",))
            assert hub.dropped == 1

            await hub.emit_async([event("again", "nope"), event("", "nope")])
            assert hub.dropped == 3
            await hub.aclose()
        assert audit.shutdowns == 1
        assert metrics_sink.shutdowns == 1
    assert audit.received() == ["only-audit", "both", "everyone"]
    assert metrics_sink.received() == ["both", "everyone", "known-and-unknown"]
    assert gateway.get_sample_value("polku_gateway_dropped_events_total") == 3
    emitted = gateway.get_sample_value(
        "polku_gateway_emit_events_total", {"emitter": "audit", "outcome": "emitted"}
    )
    assert emitted == 3


async def test_static_emitters_and_the_failures_of_each_in_the_result(hosts) -> None:
    good, picky = Sink(), Sink(fail={"b"})
    good_host, picky_host = hosts("good", good), hosts("picky", picky)
    await good_host.start()
    await picky_host.start()
    hub = (
        Hub(retry=FAST)
        .emitter(ExternalEmitter("good", good_host.address, retry=FAST))
        .emitter(ExternalEmitter("picky", picky_host.address, retry=FAST))
        .build()
    )
    with pytest.raises(PluginError, match="built"):
        hub.emitter(ExternalEmitter("late", good_host.address))
    result = await hub.emit_async([event("a"), event("b"), event("c", "good")])
    assert not result.ok
    assert result.delivered == {"good": 3, "picky": 1}
    assert set(result.failed) == {"picky"}
    assert isinstance(result.failed["picky"], PluginEmitError)
    assert result.failed_event_ids() == {"picky": ["b"]}
    assert result.dropped == 0

    # The sync twin, from a thread; with no resolver an unknown name is simply dropped.
    sync = await asyncio.to_thread(hub.emit, [event("d", "picky"), event("e", "else")])
    assert (sync.delivered, sync.dropped) == ({"picky": 1}, 1)
    await hub.aclose()
    assert good.shutdowns == picky.shutdowns == 1
    with pytest.raises(PluginError, match="closed"):
        await hub.emit_async([event("x")])


def test_adding_the_same_emitter_name_twice_is_refused() -> None:
    hub = Hub().emitter(ExternalEmitter("a", "127.0.0.1:1"))
    with pytest.raises(ValueError, match="already"):
        hub.emitter(ExternalEmitter("a", "127.0.0.1:2"))
    hub.close()


# -- a replica killed mid-stream -----------------------------------------------------------


class SinkProcess:
    """tests/ingestor/emitter_plugin.py as a child process (run_plugin: a real SDK plugin)."""

    def __init__(self, registry: str, db: Path, *extra: str) -> None:
        self.argv = [sys.executable, str(PLUGIN), "--registry", registry, "--db", str(db), *extra]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                await self.kill()


async def test_a_replica_sigkilled_mid_stream_loses_no_event_and_the_sink_has_each_once(
    registry: RegistryServer, client: RegistryClient, tmp_path: Path
) -> None:
    """What is asserted, and why it follows from the documented guarantee:

    - every emit call returns without error: each batch in flight on the killed
      instance fails at the transport level and is resent, whole, to the survivor;
    - the sink's ``delivered`` table (deduplicated by id, as an idempotent emitter
      does) holds exactly the ids emitted: none lost, none twice;
    - the raw ``received`` rows hold every id at least once, and any id received more
      than once was resent by a retry: duplicates <= the events the emitter counted
      as retried (at least once only for retried events).
    """
    db = tmp_path / "sink.db"
    sinks = [SinkProcess(registry.address, db, "--delay", "0.02") for _ in range(2)]
    for sink in sinks:
        await sink.start()
    try:

        async def both_healthy() -> bool:
            plugins = await client.list_plugins(name="sink")
            return sum(p.status == pb.PLUGIN_STATUS_HEALTHY for p in plugins) == 2

        await eventually(both_healthy, within=30, what="both sink instances HEALTHY")
        metrics = CollectorRegistry()
        policy = RetryPolicy(max_attempts=6, initial_backoff=0.02, max_backoff=0.2, budget=20)
        async with RegistryResolver(registry.address) as resolver:
            await resolver.wait_for_async(lambda v: len(v.emitter_endpoints("sink")) == 2, 10)
            emitter = ExternalEmitter(
                "sink", resolver=resolver, retry=policy, connect_timeout=2, metrics=metrics
            )
            batches, size, workers = 40, 5, 4
            sent: list[str] = []
            done = asyncio.Event()
            errors: list[PluginEmitError] = []

            async def worker(w: int) -> None:
                for b in range(w, batches, workers):
                    ids = [f"b{b}-e{n}" for n in range(size)]
                    sent.extend(ids)
                    try:
                        await emitter.emit_async([event_pb.Event(id=i, source="t") for i in ids])
                    except PluginEmitError as exc:
                        errors.append(exc)
                    if len(sent) >= batches * size // 2:
                        done.set()

            tasks = [asyncio.create_task(worker(w)) for w in range(workers)]
            await done.wait()  # half the batches sent, others in flight
            await sinks[0].kill()
            await asyncio.gather(*tasks)
            await emitter.aclose()

        assert errors == []
        with sqlite3.connect(db) as sink_db:
            delivered = [row[0] for row in sink_db.execute("SELECT id FROM delivered")]
            received = [row[0] for row in sink_db.execute("SELECT id FROM received")]
        assert sorted(delivered) == sorted(sent)
        assert len(sent) == batches * size
        assert set(received) == set(sent)
        duplicates = len(received) - len(set(received))
        retried = (
            metrics.get_sample_value(
                "polku_gateway_emit_events_total", {"emitter": "sink", "outcome": "retried"}
            )
            or 0
        )
        assert duplicates <= retried
        # Calls were in flight on the killed instance (or went to it before the registry
        # saw it die): the kill really landed mid-stream.
        assert retried >= 1
        emitted = metrics.get_sample_value(
            "polku_gateway_emit_events_total", {"emitter": "sink", "outcome": "emitted"}
        )
        assert emitted == batches * size
    finally:
        for sink in sinks:
            await sink.stop()
