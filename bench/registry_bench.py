"""Registry RPCs against a raw no-op grpc.aio servicer, measured side by side.

Both servers run as subprocesses (each gets a core of its own, as in production);
the client runs here. Scenarios: Heartbeat, Resolve, Register (durable, group
commit; on SQLite and on PostgreSQL when POLKU_TEST_POSTGRES_URL is set),
ListPlugins; then a registry holding N registrations: ListPlugins of all,
start-up time and resident memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.common import Load, Process, closed_loop, cpu_seconds, python, row
from registry.testing import FakePlugin
from registry.wire import pb, pb_grpc

HERE = Path(__file__).resolve().parent


def _registry(db: str, *extra: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--health-interval", "1h", "--deregister-after", "0", *extra])


def _raw(list_size: int = 0) -> Process:
    return Process([python(), str(HERE / "raw_server.py"), "--list-size", str(list_size)])


def _info(i: int, run: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=f"b{run}-{i}", version="1.0.0", type=1, sources=[f"s{run}-{i}"])  # type: ignore[arg-type]


async def _measure(
    stub: Any, scenario: str, run: str, plugin: FakePlugin, seconds: float, concurrency: int
) -> Load:
    if scenario == "Heartbeat":
        ids = []
        for i in range(64):
            response = await stub.Register(
                pb.RegisterRequest(info=_info(i, run + "h"), address=plugin.address)
            )
            ids.append(response.plugin_id)
        return await closed_loop(
            lambda i: stub.Heartbeat(pb.HeartbeatRequest(plugin_id=ids[i % len(ids)])),
            concurrency=concurrency,
            seconds=seconds,
        )
    if scenario == "Resolve":
        request = pb.ResolveRequest(source=plugin.sources[0])
        return await closed_loop(
            lambda i: stub.Resolve(request), concurrency=concurrency, seconds=seconds
        )
    if scenario == "Register":
        address = plugin.address
        return await closed_loop(
            lambda i: stub.Register(
                pb.RegisterRequest(info=_info(i, run), address=address, no_lease=True)
            ),
            concurrency=concurrency,
            seconds=seconds,
        )
    if scenario == "ListPlugins":
        page = pb.ListPluginsRequest(page_size=10, type=1)  # type: ignore[arg-type]
        return await closed_loop(
            lambda i: stub.ListPlugins(page), concurrency=concurrency, seconds=seconds
        )
    raise ValueError(scenario)


async def _wait_healthy(stub: Any, source: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (await stub.Resolve(pb.ResolveRequest(source=source))).endpoints:
            return
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    raise RuntimeError("the bench plugin never became HEALTHY")


async def _throughput(
    quick: bool, db: str, label: str, scenarios: list[str]
) -> list[dict[str, Any]]:
    seconds = 1.0 if quick else 4.0
    rows: list[dict[str, Any]] = []
    raw, ours = _raw(), _registry(db)
    try:
        async with (
            FakePlugin(name="bench", sources=["bench"]) as plugin,
            grpc.aio.insecure_channel(raw.wait_ready()) as raw_ch,
            grpc.aio.insecure_channel(ours.wait_ready()) as our_ch,
        ):
            raw_stub, our_stub = (
                pb_grpc.PluginRegistryStub(raw_ch),
                pb_grpc.PluginRegistryStub(our_ch),
            )
            await our_stub.Register(
                pb.RegisterRequest(info=plugin.info(), address=plugin.address, no_lease=True)
            )
            await _wait_healthy(our_stub, "bench")
            for scenario in scenarios:
                for concurrency in (1, 64):
                    run = uuid.uuid4().hex[:6]
                    raw_cpu = cpu_seconds(raw.proc.pid)
                    base = await _measure(raw_stub, scenario, run, plugin, seconds, concurrency)
                    raw_cpu = cpu_seconds(raw.proc.pid) - raw_cpu
                    our_cpu = cpu_seconds(ours.proc.pid)
                    mine = await _measure(our_stub, scenario, run, plugin, seconds, concurrency)
                    our_cpu = cpu_seconds(ours.proc.pid) - our_cpu
                    target = {"Register": "≥ 0.50", "ListPlugins": "-"}.get(scenario, "≥ 0.70")
                    rows.append(
                        row(
                            f"{scenario} c={concurrency} ({label})",
                            mine.rate,
                            base.rate,
                            target if concurrency == 64 else "-",
                            p50_ms=round(mine.percentile(0.5) * 1000, 2),
                            p99_ms=round(mine.percentile(0.99) * 1000, 2),
                            raw_p50_ms=round(base.percentile(0.5) * 1000, 2),
                            raw_p99_ms=round(base.percentile(0.99) * 1000, 2),
                        )
                    )
                    if scenario == "Register" and concurrency == 64:
                        # Server CPU per call (all threads, from /proc): the registry's
                        # own work per registration beside the raw servicer's gRPC floor.
                        rows.append(
                            row(
                                f"Register c=64 ({label}) server CPU/call",
                                our_cpu / max(1, mine.calls) * 1e6,
                                raw_cpu / max(1, base.calls) * 1e6,
                                "-",
                                unit="µs",
                            )
                        )
    finally:
        raw.stop()
        ours.stop()
    return rows


async def _populate(address: str, count: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)
        semaphore = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with semaphore:
                await stub.Register(
                    pb.RegisterRequest(
                        info=_info(i, "big"), address=f"127.0.0.1:{1 + i % 4}", no_lease=True
                    )
                )

        await asyncio.gather(*(one(i) for i in range(count)))


async def _settled(address: str) -> None:
    """Wait until start-up's background work is done: a resumed Watch answers only
    once the stored change log is loaded (the message cache warms alongside)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = pb_grpc.PluginRegistryStub(channel).Watch(pb.WatchRequest(since_revision=1))
        async for _ in stream:
            break
        stream.cancel()


async def _list_all(address: str, count: int, calls: int) -> Load:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    ) as ch:
        stub = pb_grpc.PluginRegistryStub(ch)
        request = pb.ListPluginsRequest(page_size=count)
        latencies = []
        began = time.perf_counter()
        for _ in range(calls):
            started = time.perf_counter()
            response = await stub.ListPlugins(request)
            latencies.append(time.perf_counter() - started)
            assert len(response.plugins) == count, len(response.plugins)
        return Load(calls, time.perf_counter() - began, latencies)


async def _big(quick: bool, folder: str) -> list[dict[str, Any]]:
    count = 1000 if quick else 10_000
    db = f"sqlite:///{folder}/big.db"
    first = _registry(db)
    try:
        fresh_address = first.wait_ready()
        began = time.perf_counter()
        await _populate(fresh_address, count)
        load_seconds = time.perf_counter() - began
        await _list_all(fresh_address, count, 1)  # the same caches a restart warms
        fresh_rss = first.rss_mb()
    finally:
        first.stop()
    ours, raw = _registry(db), _raw(count)
    try:
        address = ours.wait_ready()
        startup = ours.ready_at - ours.started
        raw_address = raw.wait_ready()
        raw_startup = raw.ready_at - raw.started
        calls = 5 if quick else 30
        cold = await _list_all(address, count, 1)  # right after start: caches still cold
        await _settled(address)
        mine = await _list_all(address, count, calls)
        base = await _list_all(raw_address, count, calls)
        rss = ours.rss_mb()
    finally:
        ours.stop()
        raw.stop()
    return [
        row(
            f"ListPlugins all {count}",
            mine.percentile(0.99) * 1000,
            base.percentile(0.99) * 1000,
            "p99 ≤ 100 ms",
            unit="p99 ms",
            p50_ms=round(mine.percentile(0.5) * 1000, 2),
        ),
        row(
            f"ListPlugins all {count}, first after start",
            cold.percentile(0.5) * 1000,
            base.percentile(0.5) * 1000,
            "-",
            unit="ms",
        ),
        # Registering them all, 64 in flight, each durable when answered.
        row(f"load {count} registrations", load_seconds, 0, "-", unit="s"),
        row(f"start-up with {count}", startup, raw_startup, "≤ 2 s", unit="s"),
        row(f"resident memory with {count}", rss, 0, "≤ 250 MB", unit="MB"),
        # SPEC §5: after a restart ≤ 1.2x a fresh load of the same registrations.
        row(f"RSS after restart vs fresh load, {count}", rss, fresh_rss, "≤ 1.20", unit="MB"),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Every registry scenario; rows for bench/run.py."""

    async def main() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as folder:
            rows = await _throughput(
                quick,
                f"sqlite:///{folder}/r.db",
                "sqlite",
                ["Heartbeat", "Resolve", "Register", "ListPlugins"],
            )
            postgres = os.environ.get("POLKU_TEST_POSTGRES_URL")
            if postgres:
                async with _fresh_postgres(postgres) as url:
                    rows += await _throughput(quick, url, "postgres", ["Register"])
            rows += await _big(quick, folder)
            return rows

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def _fresh_postgres(url: str) -> AsyncIterator[str]:
    """A new empty database beside the given one, dropped after: runs never meet."""
    import asyncpg  # only when PostgreSQL is benchmarked
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = f"polku_bench_{uuid.uuid4().hex[:8]}"
    admin = {
        "host": parsed.host,
        "port": parsed.port or 5432,
        "user": parsed.username,
        "database": parsed.database,
    }
    conn = await asyncpg.connect(**admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
