"""Measurement and the request/response rows of the etcd peer suite (``bench.peer_etcd``).

Server CPU per operation is utime + stime of the server process (``/proc/PID/stat``, all
threads) over the measured window, divided by the operations in it. The two systems
alternate per repetition (ours, etcd, ours, etcd, ...) and each system's repetitions are
pooled.

- lease renewals: ``STREAMS`` streams with one lease each and one renewal in flight on
  each: our ``KeepAlive`` (unary ``Heartbeat`` from ``STREAMS`` callers while the registry
  answers ``KeepAlive`` with UNIMPLEMENTED; the row says which) vs ``LeaseKeepAlive``;
- resolve: ``Resolve`` of a source with 3 HEALTHY instances vs ``Range`` of a prefix of 3
  keys, 64 in flight;
- registrations: ``Register`` with a lease, pointing at a live plugin, the window lasting
  until the registry is quiet again (its first health checks included), vs ``LeaseGrant`` +
  ``Put`` with the lease, 64 in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.common import Load, Process, closed_loop, cpu_quiet, cpu_seconds, python, row
from bench.etcd import prefix_end, rpc, rpc_grpc
from registry.testing import FakePlugin
from registry.ulid import new_ulid
from registry.wire import pb, pb_grpc

DEADLINE = 30.0  # for any one call or wait: a broken run, not a measurement
OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
STREAMS = 16  # renewal streams (one lease each), one renewal in flight on each
IN_FLIGHT = 64
RESOLVE_KEYS = 3
LONG_TTL = 3600


@dataclass(frozen=True)
class Plan:
    rounds: int  # alternating repetitions of each throughput scenario
    seconds: float  # length of one repetition
    propagations: int  # writes per system and watcher count
    big: int  # the "10,000" scenario's size
    list_calls: int
    idle_seconds: float
    expiry_rounds: int
    expiry_each: int  # leases expiring at once per system and round


FULL = Plan(5, 2.0, 200, 10_000, 30, 10.0, 2, 4)
QUICK = Plan(2, 0.4, 20, 1_000, 5, 2.0, 1, 2)


@dataclass
class Tally:
    """Operations, their latencies and the server's CPU, pooled over repetitions."""

    ops: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, load: Load, cpu: float) -> None:
        self.ops += load.calls
        self.seconds += load.seconds
        self.cpu += cpu
        self.latencies += load.latencies

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.ops if self.ops else 0.0

    def ms(self, q: float) -> float:
        return round(Load(self.ops, self.seconds, self.latencies).percentile(q) * 1000, 2)


@dataclass
class Side:
    """One system under test: its server process and what the client holds of it."""

    pid: int
    address: str
    channel: grpc.aio.Channel


async def measured(
    pid: int, body: Callable[[], Awaitable[Load]], *, settle: bool
) -> tuple[Load, float]:
    """Run ``body``; the server CPU it cost, after its background work if ``settle``."""
    before = cpu_seconds(pid)
    load = await body()
    if settle:
        await cpu_quiet(pid)
    return load, cpu_seconds(pid) - before


async def alternate(
    rounds: int,
    ours: tuple[int, Callable[[], Awaitable[Load]]],
    etcd: tuple[int, Callable[[], Awaitable[Load]]],
    *,
    settle: bool = False,
) -> tuple[Tally, Tally]:
    """A B A B ...: ``rounds`` repetitions of each, pooled per system."""
    tallies = Tally(), Tally()
    for _ in range(rounds):
        for (pid, body), tally in zip((ours, etcd), tallies, strict=True):
            load, cpu = await measured(pid, body, settle=settle)
            tally.add(load, cpu)
    return tallies


def peer_row(
    scenario: str, ours: float, etcd: float, target: str, unit: str, **extra: object
) -> dict[str, Any]:
    """``bench.common.row`` with etcd as the baseline, small figures to 3 decimals."""
    result = row(scenario, ours, etcd, target, unit, **extra)
    result["ours"], result["baseline"] = _figure(ours), _figure(etcd)
    return result


def _figure(x: float) -> float:
    return round(x, 1) if abs(x) >= 100 else round(x, 3)


def cpu_row(scenario: str, ours: Tally, etcd: Tally, target: str) -> dict[str, Any]:
    return peer_row(
        f"{scenario}: server CPU/op",
        ours.cpu_us,
        etcd.cpu_us,
        target,
        unit="µs CPU/op",
        p50_ms=ours.ms(0.5),
        p99_ms=ours.ms(0.99),
        etcd_p50_ms=etcd.ms(0.5),
        etcd_p99_ms=etcd.ms(0.99),
        ops=ours.ops,
        etcd_ops=etcd.ops,
    )


def rate_row(scenario: str, ours: Tally, etcd: Tally) -> dict[str, Any]:
    return peer_row(
        scenario, ours.rate, etcd.rate, "-", "calls/s", p50_ms=ours.ms(0.5), p99_ms=ours.ms(0.99),
        etcd_p50_ms=etcd.ms(0.5), etcd_p99_ms=etcd.ms(0.99),
    )  # fmt: skip


def info(name: str, source: str | None = None) -> pb.PluginInfo:
    return pb.PluginInfo(
        name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[source or name]
    )


def value(name: str, address: str, source: str | None = None) -> bytes:
    """What etcd stores per instance: a record like the registry's own, for equal sizes."""
    record = pb.RegisteredPlugin(
        plugin_id=new_ulid(),
        info=info(name, source),
        address=address,
        status=pb.PLUGIN_STATUS_HEALTHY,
        lease_ttl_seconds=LONG_TTL,
        revision=1,
    )
    for stamp in (record.registered_at, record.last_heartbeat_at, record.last_check_at):
        stamp.GetCurrentTime()
    return record.SerializeToString()


async def register(stub: Any, request: pb.RegisterRequest) -> str:
    response = await stub.Register(request, timeout=DEADLINE)
    if not response.accepted:
        raise RuntimeError(f"registration refused: {response.message}")
    plugin_id: str = response.plugin_id
    return plugin_id


async def etcd_register(channel: grpc.aio.Channel, key: bytes, data: bytes, ttl: int) -> int:
    """LeaseGrant + Put with the lease: etcd's registration of one instance."""
    lease = await rpc_grpc.LeaseStub(channel).LeaseGrant(
        rpc.LeaseGrantRequest(TTL=ttl), timeout=DEADLINE
    )
    await rpc_grpc.KVStub(channel).Put(
        rpc.PutRequest(key=key, value=data, lease=lease.ID), timeout=DEADLINE
    )
    lease_id: int = lease.ID
    return lease_id


def registry_process(db: str, *extra: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--max-plugins", "100000", *extra])


def plugin_process() -> Process:
    args = [python(), "-u", "-m", "registry.testing", "--name", "peer", "--source", "peer"]
    return Process(args, r"listening on (\S+)", stdout=True)


# -- scenarios ---------------------------------------------------------------------------


async def _keepalive_works(stub: Any, plugin_id: str) -> bool:
    """False while the registry answers KeepAlive with UNIMPLEMENTED."""
    call = stub.KeepAlive()
    try:
        await call.write(pb.KeepAliveRequest(plugin_id=plugin_id))
        response = await asyncio.wait_for(call.read(), DEADLINE)
        return response is not grpc.aio.EOF and bool(response.acknowledged)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return False
        raise
    finally:
        call.cancel()


async def _renew_loop(
    calls: list[Any], requests: list[Any], seconds: float, ok: Callable[[Any], bool]
) -> Load:
    """One renewal in flight on each stream, for about ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one(call: Any, request: Any) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call.write(request)
            response = await asyncio.wait_for(call.read(), DEADLINE)
            if response is grpc.aio.EOF or not ok(response):
                raise RuntimeError(f"renewal refused: {response}")
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(one(c, r) for c, r in zip(calls, requests, strict=True)))
    return Load(len(latencies), time.perf_counter() - began, latencies)


async def renewals(plan: Plan, ours: Side, etcd: Side, plugin: str) -> list[dict[str, Any]]:
    stub = pb_grpc.PluginRegistryStub(ours.channel)
    ids = [
        await register(
            stub,
            pb.RegisterRequest(info=info(f"renew-{i}"), address=plugin, lease_ttl_seconds=LONG_TTL),
        )
        for i in range(STREAMS)
    ]
    lease = rpc_grpc.LeaseStub(etcd.channel)
    leases = [
        (await lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=LONG_TTL), timeout=DEADLINE)).ID
        for _ in range(STREAMS)
    ]
    etcd_calls = [lease.LeaseKeepAlive() for _ in leases]
    etcd_requests = [rpc.LeaseKeepAliveRequest(ID=x) for x in leases]
    streaming = await _keepalive_works(stub, ids[0])
    our_calls = [stub.KeepAlive() for _ in ids] if streaming else []
    our_requests = [pb.KeepAliveRequest(plugin_id=x) for x in ids]
    heartbeats = [pb.HeartbeatRequest(plugin_id=x) for x in ids]

    async def ours_round() -> Load:
        if streaming:
            return await _renew_loop(
                our_calls, our_requests, plan.seconds, lambda r: bool(r.acknowledged)
            )
        return await closed_loop(
            lambda i: stub.Heartbeat(heartbeats[i % len(heartbeats)], timeout=DEADLINE),
            concurrency=STREAMS,
            seconds=plan.seconds,
        )

    async def etcd_round() -> Load:
        return await _renew_loop(etcd_calls, etcd_requests, plan.seconds, lambda r: r.TTL > 0)

    try:
        for calls, requests in ((our_calls, our_requests), (etcd_calls, etcd_requests)):
            for call, request in zip(calls, requests, strict=False):  # open them, unmeasured
                await call.write(request)
                await asyncio.wait_for(call.read(), DEADLINE)
        mine, theirs = await alternate(plan.rounds, (ours.pid, ours_round), (etcd.pid, etcd_round))
    finally:
        for call in [*our_calls, *etcd_calls]:
            call.cancel()
    await cpu_quiet(ours.pid)  # a broken KeepAlive stream makes the registry check its plugin
    how = "KeepAlive" if streaming else "unary Heartbeat (KeepAlive UNIMPLEMENTED)"
    scenario = f"etcd: renewal, {how} vs LeaseKeepAlive, {STREAMS} streams"
    return [
        cpu_row(scenario, mine, theirs, "≤ 2.0"),
        rate_row(f"{scenario}: rate", mine, theirs),
    ]


async def resolve(plan: Plan, ours: Side, etcd: Side) -> list[dict[str, Any]]:
    """One plugin with 3 instances (3 live plugin servers: an instance is a name at an
    address) vs 3 keys under one prefix."""
    async with contextlib.AsyncExitStack() as stack:
        plugins = [
            await stack.enter_async_context(FakePlugin(name="resolve", sources=["peer-resolve"]))
            for _ in range(RESOLVE_KEYS)
        ]
        return await _resolve(plan, ours, etcd, [p.address for p in plugins])


async def _resolve(
    plan: Plan, ours: Side, etcd: Side, addresses: list[str]
) -> list[dict[str, Any]]:
    stub = pb_grpc.PluginRegistryStub(ours.channel)
    source = "peer-resolve"
    prefix = f"/peer/resolve/{source}/".encode()
    put = rpc_grpc.KVStub(etcd.channel)
    for i, address in enumerate(addresses):
        request = pb.RegisterRequest(info=info("resolve", source), address=address, no_lease=True)
        await register(stub, request)
        data = value(f"resolve-{i}", address, source)
        await put.Put(rpc.PutRequest(key=prefix + str(i).encode(), value=data), timeout=DEADLINE)
    query = pb.ResolveRequest(source=source)
    deadline = time.perf_counter() + DEADLINE
    while len((await stub.Resolve(query, timeout=DEADLINE)).endpoints) < RESOLVE_KEYS:
        if time.perf_counter() > deadline:
            raise RuntimeError("the resolve plugins never became HEALTHY")
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    ranged = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
    if (await put.Range(ranged, timeout=DEADLINE)).count != RESOLVE_KEYS:
        raise RuntimeError("etcd does not hold the resolve keys")

    async def ours_round() -> Load:
        return await closed_loop(
            lambda i: stub.Resolve(query, timeout=DEADLINE),
            concurrency=IN_FLIGHT,
            seconds=plan.seconds,
        )

    async def etcd_round() -> Load:
        return await closed_loop(
            lambda i: put.Range(ranged, timeout=DEADLINE),
            concurrency=IN_FLIGHT,
            seconds=plan.seconds,
        )

    mine, theirs = await alternate(plan.rounds, (ours.pid, ours_round), (etcd.pid, etcd_round))
    scenario = f"etcd: Resolve vs Range of {RESOLVE_KEYS} keys, c={IN_FLIGHT}"
    return [cpu_row(scenario, mine, theirs, "-"), rate_row(f"{scenario}: rate", mine, theirs)]


async def registrations(plan: Plan, ours: Side, etcd: Side, plugin: str) -> list[dict[str, Any]]:
    """Register (its first health check within the window) vs LeaseGrant + Put."""
    stub = pb_grpc.PluginRegistryStub(ours.channel)
    counter = itertools.count()

    async def ours_round() -> Load:
        async def one(i: int) -> None:
            request = pb.RegisterRequest(
                info=info(f"reg-{next(counter)}"), address=plugin, lease_ttl_seconds=LONG_TTL
            )
            await register(stub, request)

        return await closed_loop(one, concurrency=IN_FLIGHT, seconds=plan.seconds)

    async def etcd_round() -> Load:
        async def one(i: int) -> None:
            name = f"reg-{next(counter)}"
            key = f"/peer/reg/{name}".encode()
            await etcd_register(etcd.channel, key, value(name, plugin), LONG_TTL)

        return await closed_loop(one, concurrency=IN_FLIGHT, seconds=plan.seconds)

    mine, theirs = await alternate(
        plan.rounds, (ours.pid, ours_round), (etcd.pid, etcd_round), settle=True
    )
    scenario = f"etcd: Register vs LeaseGrant+Put, c={IN_FLIGHT}"
    return [
        cpu_row(scenario, mine, theirs, "≤ 1.5"),
        rate_row(f"{scenario}: rate", mine, theirs),
    ]
