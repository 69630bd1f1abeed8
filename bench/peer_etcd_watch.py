"""Watch rows of the etcd peer suite (``bench.peer_etcd``): propagation and expiry.

- propagation with 1 and 100 watchers: ``Register`` answered → the measuring watcher (a
  Watch stream of all plugins, in this process) has the plugin, vs ``Put`` answered → its
  watch event (an etcd Watch stream on the prefix); the other 99 watchers of each are
  streams in processes of their own (``bench.watchers``, ``bench.etcd.watchers``). Writes
  go one at a time, alternating in chunks of 10; ours also waits for the plugin to turn
  HEALTHY (``healthy_p99_ms``) so that the window holds its first check. Server CPU per
  write is over the same windows.
- expiry: a lease of 3 s never renewed → the watcher sees it gone (EXPIRED or removed),
  vs etcd lease expiry → watch DELETE, both systems at once in each round.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from bench.common import Load, Process, python
from bench.etcd import kv, prefix_end, rpc, rpc_grpc
from bench.peer_etcd_calls import (
    DEADLINE,
    Plan,
    Side,
    alternate,
    etcd_register,
    info,
    peer_row,
    register,
    value,
)
from registry.wire import pb, pb_grpc

PROP_PREFIX = b"/peer/prop/"


class Arrivals:
    """When each key was first seen; waiting for one that has not come yet."""

    def __init__(self) -> None:
        self.times: dict[object, float] = {}
        self._waiting: dict[object, asyncio.Future[float]] = {}

    def note(self, key: object, at: float) -> None:
        if key in self.times:
            return
        self.times[key] = at
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(at)

    async def wait(self, key: object, within: float = DEADLINE) -> float:
        if key in self.times:
            return self.times[key]
        future = self._waiting.setdefault(key, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(future, within)


class OurWatch:
    """One Watch stream of all plugins: when each appeared, turned HEALTHY, went away."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.seen, self.healthy, self.gone = Arrivals(), Arrivals(), Arrivals()
        self.ready = asyncio.Event()
        self._call = pb_grpc.PluginRegistryStub(channel).Watch(pb.WatchRequest())
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._call:
            now = time.perf_counter()
            for plugin in message.upserted:
                self.seen.note(plugin.plugin_id, now)
                if plugin.status == pb.PLUGIN_STATUS_HEALTHY:
                    self.healthy.note(plugin.plugin_id, now)
                elif plugin.status == pb.PLUGIN_STATUS_EXPIRED:
                    self.gone.note(plugin.plugin_id, now)
            for plugin_id in message.removed_plugin_ids:
                self.gone.note(plugin_id, now)
            self.ready.set()

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class EtcdWatch:
    """One etcd Watch stream on a prefix: when each key was put, and deleted."""

    def __init__(self, channel: grpc.aio.Channel, prefix: bytes) -> None:
        self.put, self.deleted = Arrivals(), Arrivals()
        self.ready = asyncio.Event()
        self._call = rpc_grpc.WatchStub(channel).Watch()
        self._task = asyncio.create_task(self._read(prefix))

    async def _read(self, prefix: bytes) -> None:
        create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix))
        await self._call.write(rpc.WatchRequest(create_request=create))
        async for response in self._call:
            now = time.perf_counter()
            for event in response.events:
                kind = self.put if event.type == kv.Event.PUT else self.deleted
                kind.note(event.kv.key, now)
            if response.created:
                self.ready.set()

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@asynccontextmanager
async def extra_watchers(ours: str, etcd: str, count: int) -> AsyncIterator[None]:
    """``count`` more watch streams on each system, from processes of their own."""
    if count <= 0:
        yield
        return
    commands = [
        [python(), "-m", "bench.watchers", ours, str(count)],
        [python(), "-m", "bench.etcd.watchers", etcd, str(count), PROP_PREFIX.decode()],
    ]
    processes = [Process(args, r"^(watching)$", stdout=True) for args in commands]
    try:
        for process in processes:
            await asyncio.to_thread(process.wait_ready, 120)
        yield
    finally:
        for process in processes:
            process.stop()


async def propagation(
    plan: Plan,
    ours: Side,
    etcd: Side,
    plugin: str,
    watches: tuple[OurWatch, EtcdWatch],
    watchers: int,
) -> list[dict[str, Any]]:
    """Write answered → the measuring watcher (here) has it; the others elsewhere."""
    stub = pb_grpc.PluginRegistryStub(ours.channel)
    put = rpc_grpc.KVStub(etcd.channel)
    our_watch, etcd_watch = watches
    healthy: list[float] = []
    counter = itertools.count()
    run = f"{watchers}w"
    chunk = 10

    async def ours_chunk() -> Load:
        latencies: list[float] = []
        began = time.perf_counter()
        for _ in range(chunk):
            name = f"prop-{run}-{next(counter)}"
            request = pb.RegisterRequest(info=info(name), address=plugin, no_lease=True)
            plugin_id = await register(stub, request)
            answered = time.perf_counter()
            latencies.append(max(0.0, await our_watch.seen.wait(plugin_id) - answered))
            healthy.append(max(0.0, await our_watch.healthy.wait(plugin_id) - answered))
        return Load(chunk, time.perf_counter() - began, latencies)

    async def etcd_chunk() -> Load:
        latencies: list[float] = []
        began = time.perf_counter()
        for _ in range(chunk):
            name = f"prop-{run}-{next(counter)}"
            key = PROP_PREFIX + name.encode()
            await put.Put(rpc.PutRequest(key=key, value=value(name, plugin)), timeout=DEADLINE)
            answered = time.perf_counter()
            latencies.append(max(0.0, await etcd_watch.put.wait(key) - answered))
        return Load(chunk, time.perf_counter() - began, latencies)

    async with extra_watchers(ours.address, etcd.address, watchers - 1):
        mine, theirs = await alternate(
            max(1, plan.propagations // chunk), (ours.pid, ours_chunk), (etcd.pid, etcd_chunk)
        )
    to_healthy = Load(len(healthy), 1.0, healthy)
    target = "p99 ≤ 1.0 (SPEC §5)" if watchers == 100 else "-"
    return [
        peer_row(
            f"etcd: propagation, {watchers} watcher(s), answered → watcher has it",
            mine.ms(0.99),
            theirs.ms(0.99),
            target,
            unit="p99 ms",
            p50_ms=mine.ms(0.5),
            p99_ms=mine.ms(0.99),
            etcd_p50_ms=theirs.ms(0.5),
            healthy_p50_ms=round(to_healthy.percentile(0.5) * 1000, 2),
            healthy_p99_ms=round(to_healthy.percentile(0.99) * 1000, 2),
            writes=mine.ops,
        ),
        peer_row(
            f"etcd: propagation, {watchers} watcher(s): server CPU/write",
            mine.cpu_us,
            theirs.cpu_us,
            "-",
            unit="µs CPU/op",
        ),
    ]


async def expiry(
    plan: Plan, ours: Side, etcd: Side, plugin: str, watches: tuple[OurWatch, EtcdWatch]
) -> list[dict[str, Any]]:
    """TTL 3 s, never renewed → the watcher sees it gone; both systems at once per round."""
    stub = pb_grpc.PluginRegistryStub(ours.channel)
    our_watch, etcd_watch = watches
    counter = itertools.count()

    async def ours_one() -> float:
        name = f"expire-{next(counter)}"
        request = pb.RegisterRequest(info=info(name), address=plugin, lease_ttl_seconds=3)
        plugin_id = await register(stub, request)
        answered = time.perf_counter()
        return await our_watch.gone.wait(plugin_id, DEADLINE) - answered

    async def etcd_one() -> float:
        key = PROP_PREFIX + f"expire-{next(counter)}".encode()
        await etcd_register(etcd.channel, key, value("expire", plugin), 3)
        answered = time.perf_counter()
        return await etcd_watch.deleted.wait(key, DEADLINE) - answered

    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(plan.expiry_rounds):
        each = plan.expiry_each
        results = await asyncio.gather(
            *(ours_one() for _ in range(each)), *(etcd_one() for _ in range(each))
        )
        mine += results[:each]
        theirs += results[each:]
    ours_load, etcd_load = Load(len(mine), 1.0, mine), Load(len(theirs), 1.0, theirs)
    return [
        peer_row(
            "etcd: expiry, TTL 3 s → watcher sees it gone (p50)",
            ours_load.percentile(0.5),
            etcd_load.percentile(0.5),
            "-",
            unit="s (p50)",
            max_s=round(max(mine), 3),
            etcd_max_s=round(max(theirs), 3),
            samples=len(mine),
        )
    ]
