"""Ingest through ExternalIngestor (resolved via a registry) against a bare generated stub.

Both call the same FakePlugin, run as a subprocess so that it has a core of its own,
as does the registry; the clients run here. Scenarios: async Ingest at concurrency 1
and 64, sync Ingest one at a time (``ingest()`` on the caller's thread, over its own
sync channel, against grpc's sync stub on a sync channel of its own), and
change propagation: Register answered → a watching resolver has the plugin (one
watcher, then 100). Prints numbers and ratios, never verdicts.

    python -m bench.ingest_bench [--quick]
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench.common import Load, Process, closed_loop, python, row
from ingestor import ExternalIngestor, IngestContext, RegistryResolver, ResolverView
from registry.client import RegistryClient
from registry.wire import pb, pb_grpc

SOURCE = "bench"
PAYLOAD = b"one\ntwo\nthree\n"


def _plugin() -> Process:
    args = [python(), "-u", "-m", "registry.testing", "--name", SOURCE, "--source", SOURCE]
    return Process(args, r"listening on (\S+)", stdout=True)


def _registry(db: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--health-interval", "1h"])


def _latency_rows(scenario: str, ours: Load, base: Load) -> list[dict[str, Any]]:
    rows = []
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        mine, theirs = ours.percentile(q) * 1000, base.percentile(q) * 1000
        rows.append(
            {
                "scenario": f"{scenario} {label} latency",
                "ours": round(mine, 3),
                "baseline": round(theirs, 3),
                "ratio": round(mine / theirs, 3) if theirs else 0.0,
                "target": "≤ 1.10" if label == "p50" else "",
                "unit": "ms",
            }
        )
    return rows


def _pooled(loads: list[Load]) -> Load:
    return Load(
        sum(x.calls for x in loads),
        sum(x.seconds for x in loads),
        [t for x in loads for t in x.latencies],
    )


async def _interleaved(
    rounds: int, ours: Callable[[], Awaitable[Load]], base: Callable[[], Awaitable[Load]]
) -> tuple[Load, Load]:
    """Alternate short runs of the two, so both see the same (noisy, shared) machine."""
    mine: list[Load] = []
    theirs: list[Load] = []
    for _ in range(rounds):
        theirs.append(await base())
        mine.append(await ours())
    return _pooled(mine), _pooled(theirs)


def _sync_loop(call: Callable[[], object], seconds: float) -> Load:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return Load(len(latencies), time.perf_counter() - began, latencies)


async def _ingest(quick: bool, registry: str, plugin: str) -> list[dict[str, Any]]:
    # Many short alternating rounds: this machine is shared, its speed drifts.
    seconds, rounds = (0.25, 4) if quick else (0.5, 10)
    rows: list[dict[str, Any]] = []
    async with RegistryClient(registry) as client:
        await client.register(
            pb.PluginInfo(name=SOURCE, version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=[SOURCE]),
            plugin,
            no_lease=True,  # it sends no heartbeats: lives by health checks alone
        )
    ctx = IngestContext(SOURCE)
    request = pb.IngestRequest(source=SOURCE, data=PAYLOAD)
    channel = grpc.aio.insecure_channel(plugin)
    stub = pb_grpc.IngestorPluginStub(channel)
    async with RegistryResolver(registry) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.endpoints(SOURCE)), 30)
        async with ExternalIngestor(SOURCE, resolver=resolver) as ingestor:
            await ingestor.ingest_async(ctx, PAYLOAD)  # connect outside the measurement
            await stub.Ingest(request)
            for concurrency in (1, 64):

                async def ours(c: int = concurrency) -> Load:
                    return await closed_loop(
                        lambda i: ingestor.ingest_async(ctx, PAYLOAD),
                        concurrency=c,
                        seconds=seconds,
                    )

                async def base(c: int = concurrency) -> Load:
                    return await closed_loop(
                        lambda i: stub.Ingest(request, timeout=30),
                        concurrency=c,
                        seconds=seconds,
                    )

                mine, theirs = await _interleaved(rounds, ours, base)
                scenario = f"Ingest async, {concurrency} in flight"
                rows.append(row(scenario, mine.rate, theirs.rate, "≥ 0.90"))
                rows += _latency_rows(scenario, mine, theirs)
        await channel.close()

        # Sync: ingest() (resolved, on this thread) against grpc's own sync stub.
        def sync_pair() -> tuple[Load, Load]:
            with (
                ExternalIngestor(SOURCE, resolver=resolver) as ingestor,
                grpc.insecure_channel(plugin) as sync_channel,
            ):
                sync_stub = pb_grpc.IngestorPluginStub(sync_channel)
                ingestor.ingest(ctx, PAYLOAD)
                sync_stub.Ingest(request)
                mine: list[Load] = []
                theirs: list[Load] = []
                # Shorter rounds, more of them, and each side first in every other one:
                # a one-at-a-time loop is the most exposed to the machine's drift.
                for i in range(rounds * 4):
                    pair = (
                        (theirs, lambda: sync_stub.Ingest(request, timeout=30)),
                        (mine, lambda: ingestor.ingest(ctx, PAYLOAD)),
                    )
                    for loads, call in pair if i % 2 == 0 else pair[::-1]:
                        loads.append(_sync_loop(call, seconds / 4))
                return _pooled(mine), _pooled(theirs)

        mine, theirs = await asyncio.to_thread(sync_pair)
        rows.append(row("Ingest sync, 1 at a time", mine.rate, theirs.rate, "≥ 0.90"))
        rows += _latency_rows("Ingest sync", mine, theirs)
    return rows


async def _propagation(
    quick: bool, registry: str, plugin: str, watchers: int
) -> list[dict[str, Any]]:
    """Register answered → the watching resolver (on the private loop thread) has it."""
    seen: dict[str, float] = {}
    resolver = RegistryResolver(registry)

    def hook(view: ResolverView) -> None:
        now = time.perf_counter()
        for plugin_id in view.plugins:
            seen.setdefault(plugin_id, now)

    resolver.subscribe(hook)
    resolver.start()
    # The other watchers are other gateways: a process of their own, as in production.
    extra = None
    if watchers > 1:
        extra = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.watchers",
            registry,
            str(watchers - 1),
            stdout=asyncio.subprocess.PIPE,
        )
    try:
        if extra is not None:
            assert extra.stdout is not None
            if (await extra.stdout.readline()).strip() != b"watching":
                raise RuntimeError("the extra watchers did not start")
        latencies = await _measure_propagation(quick, registry, plugin, resolver, seen, watchers)
    finally:
        if extra is not None:
            extra.kill()
            await extra.wait()
        await resolver.aclose()
    load = Load(len(latencies), 1.0, latencies)
    target = "p99 ≤ 10 ms" if watchers == 1 else "p99 ≤ 25 ms"
    return [
        {
            "scenario": f"Register → resolver has it, {watchers} watcher(s)",
            "ours": round(load.percentile(0.99) * 1000, 3),
            "baseline": "",
            "ratio": "",
            "target": target,
            "unit": "ms p99",
            "p50_ms": round(load.percentile(0.5) * 1000, 3),
            "p99_ms": round(load.percentile(0.99) * 1000, 3),
        }
    ]


async def _measure_propagation(
    quick: bool,
    registry: str,
    plugin: str,
    resolver: RegistryResolver,
    seen: dict[str, float],
    watchers: int,
) -> list[float]:
    count = 30 if quick else 300
    async with RegistryClient(registry) as client:
        await resolver.wait_synced_async(30)
        latencies: list[float] = []
        run = f"{watchers}-{time.monotonic_ns()}"
        for i in range(count):
            info = pb.PluginInfo(
                name=f"prop{run}-{i}",
                version="1",
                type=pb.PLUGIN_TYPE_INGESTOR,
                sources=[f"prop{run}-{i}"],
            )
            response = await client.register(info, plugin)
            answered = time.perf_counter()
            plugin_id = response.plugin_id
            await resolver.wait_for_async(functools.partial(_has, plugin_id), 10)
            latencies.append(max(0.0, seen[plugin_id] - answered))
            await client.unregister(plugin_id)
    return latencies


def _has(plugin_id: str, view: ResolverView) -> bool:
    return plugin_id in view.plugins


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Every ingest scenario; rows for bench/run.py. Bounded in time (``quick``: seconds)."""

    async def main() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as folder:
            registry = _registry(f"sqlite:///{folder}/ingest.db")
            plugin = _plugin()
            try:
                registry_address = registry.wait_ready()
                plugin_address = plugin.wait_ready()
                rows = await _ingest(quick, registry_address, plugin_address)
                for watchers in (1, 100):
                    rows += await _propagation(quick, registry_address, plugin_address, watchers)
                return rows
            finally:
                plugin.stop()
                registry.stop()

    return asyncio.run(main())


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
