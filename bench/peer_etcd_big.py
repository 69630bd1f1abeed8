"""The 10,000 rows of ``bench.peer_etcd``: list, load, memory, start-up and idle CPU.

A registry with the default health interval (its leased registrations, TTL 1 h, all
point at one live plugin process) and a fresh etcd (keys under leases of 1 h, each
value the registry's own record of an instance, so that both hold the same bytes):

- load: N registrations at 64 in flight vs N times LeaseGrant + Put, same concurrency;
- RSS after the load (after one list of all, which warms what a list needs);
- ListPlugins of all vs Range of the N keys, alternating call by call, p99;
- restart on the same SQLite file / data directory: start-up to serving, RSS after one
  list of all;
- idle CPU of both over the same window without client traffic (ours keeps health
  checking at its default interval, etcd keeps its leases).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import Load, cpu_quiet, cpu_seconds
from bench.etcd import Etcd, prefix_end, rpc, rpc_grpc
from bench.peer_etcd_calls import (
    DEADLINE,
    IN_FLIGHT,
    LONG_TTL,
    OPTIONS,
    Plan,
    etcd_register,
    info,
    peer_row,
    register,
    registry_process,
    value,
)
from registry.wire import pb, pb_grpc

PREFIX = b"/peer/big/"


async def _workers(count: int, one: Any) -> float:
    """Seconds to run ``one(i)`` for i < count from IN_FLIGHT workers."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - began


async def _load_ours(channel: grpc.aio.Channel, plugin: str, count: int) -> float:
    stub = pb_grpc.PluginRegistryStub(channel)

    async def one(i: int) -> None:
        request = pb.RegisterRequest(
            info=info(f"big-{i}"), address=plugin, lease_ttl_seconds=LONG_TTL
        )
        await register(stub, request)

    return await _workers(count, one)


async def _load_etcd(channel: grpc.aio.Channel, plugin: str, count: int) -> float:
    async def one(i: int) -> None:
        name = f"big-{i}"
        await etcd_register(channel, PREFIX + name.encode(), value(name, plugin), LONG_TTL)

    return await _workers(count, one)


async def _list_ours(channel: grpc.aio.Channel, count: int) -> float:
    stub = pb_grpc.PluginRegistryStub(channel)
    started = time.perf_counter()
    response = await stub.ListPlugins(pb.ListPluginsRequest(page_size=count), timeout=DEADLINE)
    elapsed = time.perf_counter() - started
    if len(response.plugins) != count or response.next_page_token:
        raise RuntimeError(f"ListPlugins gave {len(response.plugins)} of {count}")
    return elapsed


async def _range_etcd(channel: grpc.aio.Channel, count: int) -> float:
    request = rpc.RangeRequest(key=PREFIX, range_end=prefix_end(PREFIX))
    started = time.perf_counter()
    response = await rpc_grpc.KVStub(channel).Range(request, timeout=DEADLINE)
    elapsed = time.perf_counter() - started
    if len(response.kvs) != count:
        raise RuntimeError(f"Range gave {len(response.kvs)} of {count}")
    return elapsed


async def _settled(channel: grpc.aio.Channel) -> None:
    """A resumed Watch answers only once the stored change log is loaded."""
    stream = pb_grpc.PluginRegistryStub(channel).Watch(pb.WatchRequest(since_revision=1))
    await asyncio.wait_for(stream.read(), DEADLINE)
    stream.cancel()


async def big(plan: Plan, folder: Path, plugin: str) -> list[dict[str, Any]]:
    count = plan.big
    db = f"sqlite:///{folder}/big.db"
    ours = registry_process(db)
    etcd = Etcd(folder / "etcd-big")
    ours_list: list[float] = []
    etcd_list: list[float] = []
    try:
        address = ours.wait_ready()
        etcd.start()
        async with (
            grpc.aio.insecure_channel(address, options=OPTIONS) as our_channel,
            grpc.aio.insecure_channel(etcd.address, options=OPTIONS) as etcd_channel,
        ):
            ours_load = await _load_ours(our_channel, plugin, count)
            etcd_load = await _load_etcd(etcd_channel, plugin, count)
            await cpu_quiet(ours.proc.pid, within=10.0)  # the first checks are done
            await _list_ours(our_channel, count)
            ours_fresh = ours.rss_mb()
            await _range_etcd(etcd_channel, count)
            etcd_fresh = etcd.rss_mb()
            for _ in range(plan.list_calls):
                ours_list.append(await _list_ours(our_channel, count))
                etcd_list.append(await _range_etcd(etcd_channel, count))
        ours.stop()
        etcd.stop()
        ours = registry_process(db)
        address = await asyncio.to_thread(ours.wait_ready)
        ours_start = ours.ready_at - ours.started
        process = await asyncio.to_thread(etcd.start)
        etcd_start = process.ready_at - process.started
        async with (
            grpc.aio.insecure_channel(address, options=OPTIONS) as our_channel,
            grpc.aio.insecure_channel(etcd.address, options=OPTIONS) as etcd_channel,
        ):
            await _settled(our_channel)
            await _list_ours(our_channel, count)
            ours_restart = ours.rss_mb()
            await _range_etcd(etcd_channel, count)
            etcd_restart = etcd.rss_mb()
            await asyncio.gather(
                cpu_quiet(ours.proc.pid, within=10.0), cpu_quiet(etcd.pid, within=10.0)
            )
            pids = ours.proc.pid, etcd.pid
            before = [cpu_seconds(pid) for pid in pids]
            began = time.perf_counter()
            await asyncio.sleep(plan.idle_seconds)  # the measurement window itself
            elapsed = time.perf_counter() - began
            ours_idle, etcd_idle = (
                1000 * (cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)
            )
    finally:
        ours.stop()
        etcd.stop()
    mine, theirs = Load(len(ours_list), 1.0, ours_list), Load(len(etcd_list), 1.0, etcd_list)
    n = f"{count:,}"
    return [
        peer_row(
            f"etcd {n}: ListPlugins all vs Range of all",
            mine.percentile(0.99) * 1000,
            theirs.percentile(0.99) * 1000,
            "≤ 1.0 and ≤ 100 ms",
            unit="p99 ms",
            p50_ms=round(mine.percentile(0.5) * 1000, 2),
            p99_ms=round(mine.percentile(0.99) * 1000, 2),
            etcd_p50_ms=round(theirs.percentile(0.5) * 1000, 2),
        ),
        peer_row(
            f"etcd {n}: load, c={IN_FLIGHT}",
            ours_load,
            etcd_load,
            "-",
            unit="s",
            per_s=round(count / ours_load),
            etcd_per_s=round(count / etcd_load),
        ),
        peer_row(f"etcd {n}: RSS after a fresh load", ours_fresh, etcd_fresh, "-", unit="MB"),
        peer_row(
            f"etcd {n}: RSS after a restart",
            ours_restart,
            etcd_restart,
            "ours ≤ 1.2x its fresh load",
            unit="MB",
            ours_vs_fresh=round(ours_restart / ours_fresh, 3),
            etcd_vs_fresh=round(etcd_restart / etcd_fresh, 3),
        ),
        peer_row(f"etcd {n}: restart to serving", ours_start, etcd_start, "-", unit="s"),
        peer_row(
            f"etcd {n}: idle CPU over {plan.idle_seconds:g} s",
            ours_idle,
            etcd_idle,
            "≤ 1.0",
            unit="ms CPU/s",
            percent_of_core=round(ours_idle / 10, 2),
            etcd_percent_of_core=round(etcd_idle / 10, 2),
        ),
    ]
