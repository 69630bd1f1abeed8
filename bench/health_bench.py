"""Health checking N registrations: one round of the registry's poller against raw fan-out.

N registrations (1,000; 10,000 with ``--full``) are spread over 4 FakePlugin servers,
all in this process, as is the registry (SQLite in a temporary folder). Two figures
from the same run, in calls/s:

- ours: the registry's HealthChecker with a 1 ms interval, so that each plugin is due
  again as soon as it was checked and the poller runs flat out at its bounds. A round
  is the time for the checker's recorded results to grow by N (every plugin checked
  once), measured after a first, warm-up round. Registrations at one address share a
  Health call when they are due together (one process, one question), so a round
  makes fewer calls than it records results.
- baseline: the same N Health calls made directly, 256 in flight, over one channel
  per address with plain grpc.aio stubs: the raw fan-out rate of the same work.

The registrations are made on a first registry with a 1 h interval, which is then
stopped; the measured registry is started on the same database, so no Register
traffic competes with the round. Best of two for each side. Prints ratios, never
verdicts.

    python -m bench.health_bench [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from bench.common import row
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin, running_registry
from registry.wire import pb, pb_grpc

SERVERS = 4
CONCURRENCY = 256  # the poller's default bound (RegistrySettings.health_concurrency)
TIMEOUT = 10.0  # per call; far above what a no-op Health takes
TARGET = "≥ 0.80"
ROUND_DEADLINE = 120.0  # gives up on a round that takes longer (a broken run)


@contextlib.asynccontextmanager
async def _fakes() -> AsyncIterator[list[FakePlugin]]:
    plugins = [FakePlugin(name=f"fake{i}") for i in range(SERVERS)]
    for plugin in plugins:
        await plugin.start()
    try:
        yield plugins
    finally:
        for plugin in plugins:
            await plugin.stop()


def _results(registry: RegistryServer) -> int:
    return registry.checker.results


async def _register(address: str, plugins: list[FakePlugin], count: int) -> None:
    """Register ``count`` plugins round-robin over the fakes' addresses, 64 in flight."""
    names = iter(range(count))
    async with RegistryClient(address, timeout=60.0) as client:

        async def worker() -> None:
            for i in names:
                info = pb.PluginInfo(
                    name=f"h{i}", version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[f"h{i}"]
                )
                await client.register(info, plugins[i % len(plugins)].address, no_lease=True)

        await asyncio.gather(*(worker() for _ in range(64)))


async def _until(registry: RegistryServer, total: int) -> None:
    deadline = time.perf_counter() + ROUND_DEADLINE
    while _results(registry) < total:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"health checks stalled at {_results(registry)} of {total}")
        await asyncio.sleep(0.01)  # polling the counters, not synchronisation


async def _ours(folder: Path, count: int, rounds: int) -> float:
    """Best registrations checked per second of ``rounds`` rounds of the registry's poller."""
    best = 0.0
    async with running_registry(folder, health_interval=0.001, deregister_after=0) as registry:
        await _until(registry, count)  # the first round warms channels up
        for _ in range(rounds):
            start, began = _results(registry), time.perf_counter()
            await _until(registry, start + count)
            elapsed = time.perf_counter() - began
            best = max(best, (_results(registry) - start) / elapsed)
    return best


async def _baseline(plugins: list[FakePlugin], count: int) -> float:
    """calls/s of ``count`` Health calls, 256 in flight, one channel per address."""
    channels = [grpc.aio.insecure_channel(p.address) for p in plugins]
    try:
        stubs = [pb_grpc.IngestorPluginStub(channel) for channel in channels]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
        numbers = iter(range(count))

        async def worker() -> None:
            for i in numbers:
                await stubs[i % len(stubs)].Health(Empty(), timeout=TIMEOUT)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return count / (time.perf_counter() - began)
    finally:
        for channel in channels:
            await channel.close()


async def _scenario(count: int, rounds: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="health-bench-") as folder:
        async with _fakes() as plugins:
            async with running_registry(folder, health_interval=3600) as registry:
                await _register(registry.address, plugins, count)
                await _until(registry, count)  # every first check answered
            baseline = max([await _baseline(plugins, count) for _ in range(rounds)])
            ours = await _ours(Path(folder), count, rounds)
    return row(
        f"health round, {count:,} registrations over {SERVERS} plugin servers",
        ours,
        baseline,
        TARGET,
    )


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for bench.run: 1,000 registrations; 10,000 as well unless ``quick``."""
    counts = [1_000] if quick else [1_000, 10_000]
    return [asyncio.run(_scenario(count)) for count in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10,000 registrations as well")
    parser.add_argument("--quick", action="store_true", help="1,000 registrations (the default)")
    args = parser.parse_args()
    from bench.run import print_table

    print_table(run(quick=not args.full))


if __name__ == "__main__":
    main()
