"""Cost grows with work, not with size (SPEC §7): paging a large catalogue, idle CPU.

One registry subprocess (SQLite in a temporary folder, health interval 1 h, so that
only the first check of each registration runs) is filled in two steps:

- with N/2 leased registrations (1 h leases, never renewed: nothing is due), it is
  left alone for a few seconds and its CPU time is read from ``/proc/PID/stat``:
  the idle cost of holding them (the reaper, timers, the database monitor);
- with N in all, every plugin is listed page by page (pages of 1,000 and of 100)
  and the total time compared with listing all of them in the largest pages
  ListPlugins gives (10,000: one call up to that many). Paging is O(n) in total
  when that ratio stays about constant as N grows (an index re-sorted per page
  makes it grow with the number of pages).

N is 20,000 (2,000 with ``--quick``). The registrations point at one FakePlugin in
this process.

Then memory and idle CPU at the default health interval (10 s), issue 13: a second
registry is filled with 10,000 leased registrations (1,000 with ``--quick``) at the
FakePlugin, its RSS read after one ListPlugins of all and its CPU over an idle
window; restarted on the same file, its start-up time, the same RSS after the
stored change log is loaded, and its idle CPU with the plugin alive and then with
it gone (every check fails, the plugins turn UNHEALTHY: checks and their changes,
no client traffic). Prints figures, never verdicts.

    python -m bench.scale_bench [--quick]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from typing import Any

import grpc

from bench.common import Process, python, row
from registry.testing import FakePlugin
from registry.wire import pb, pb_grpc

IDLE_SECONDS = 5.0  # 2 s with --quick
MEMORY_IDLE_SECONDS = 10.0  # each idle window of the memory scenario (2 s with --quick)
SETTLE_SECONDS = 2.0  # after the last registration: first checks, flushes, cache warm-up
MAX_RECEIVE = 256 * 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# ListPlugins' largest page (registry.service.MAX_PAGE_SIZE): "all" in as few calls as can be.
LARGEST_PAGE = 10_000


def _registry(db: str, health_interval: str = "1h") -> Process:
    return Process(
        [
            python(),
            "-m",
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--health-interval",
            health_interval,
        ]
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: count fields after its ')'.
        fields = stat.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


async def _populate(stub: Any, address: str, first: int, count: int) -> None:
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for i in numbers:
            info = pb.PluginInfo(
                name=f"scale-{i}",
                version="1.0.0",
                type=pb.PLUGIN_TYPE_INGESTOR,
                sources=[f"scale-{i}"],
            )
            await stub.Register(
                pb.RegisterRequest(info=info, address=address, lease_ttl_seconds=3600),
                timeout=120,
            )

    await asyncio.gather(*(worker() for _ in range(64)))


async def _idle_cpu(pid: int, seconds: float) -> float:
    """Milliseconds of CPU per second (0.1 % of a core each) the process used over
    ``seconds`` of being asked nothing."""
    before, began = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)  # the measurement window itself
    return 1000 * (cpu_seconds(pid) - before) / (time.perf_counter() - began)


async def _paged(stub: Any, page_size: int, count: int) -> tuple[float, int]:
    """Seconds to list every plugin in pages of ``page_size``, and the page count."""
    seen, pages, token = 0, 0, ""
    began = time.perf_counter()
    while True:
        response = await stub.ListPlugins(
            pb.ListPluginsRequest(page_size=page_size, page_token=token), timeout=120
        )
        seen += len(response.plugins)
        pages += 1
        token = response.next_page_token
        if not token:
            break
    elapsed = time.perf_counter() - began
    assert seen == count, (seen, count)
    return elapsed, pages


async def _scenario(count: int, idle_seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    half = count // 2
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as folder:
        registry = _registry(f"sqlite:///{folder}/scale.db")
        try:
            async with (
                FakePlugin(name="scale", sources=["scale"]) as plugin,
                grpc.aio.insecure_channel(
                    registry.wait_ready(),
                    options=[("grpc.max_receive_message_length", MAX_RECEIVE)],
                ) as channel,
            ):
                stub = pb_grpc.PluginRegistryStub(channel)
                await _populate(stub, plugin.address, 0, half)
                await asyncio.sleep(SETTLE_SECONDS)  # let start-up and first checks finish
                idle = await _idle_cpu(registry.proc.pid, idle_seconds)
                rows.append(
                    row(
                        f"idle CPU with {half:,} leased plugins",
                        idle,
                        0,
                        "low; etcd peer in issue 13",
                        unit="ms CPU/s",
                        percent_of_core=round(idle / 10, 2),
                    )
                )
                await _populate(stub, plugin.address, half, count - half)
                await _paged(stub, LARGEST_PAGE, count)  # warms the message cache
                whole = min([(await _paged(stub, LARGEST_PAGE, count))[0] for _ in range(3)])
                for page_size in (1000, 100):
                    elapsed, pages = await _paged(stub, page_size, count)
                    rows.append(
                        row(
                            f"paged ListPlugins of {count:,}, {pages} pages of {page_size}"
                            f" vs pages of {LARGEST_PAGE:,}",
                            elapsed * 1000,
                            whole * 1000,
                            "O(n): ratio about constant in n",
                            unit="ms",
                            per_page_ms=round(elapsed * 1000 / pages, 2),
                        )
                    )
        finally:
            registry.stop()
    return rows


async def _resumed(stub: Any) -> None:
    """Return once a resumed Watch answers: the stored change log is loaded."""
    stream = stub.Watch(pb.WatchRequest(since_revision=1))
    async for _ in stream:
        break
    stream.cancel()


async def _memory(count: int, idle_seconds: float) -> list[dict[str, Any]]:
    """RSS fresh and after a restart, start-up, idle CPU at the default interval."""
    options = [("grpc.max_receive_message_length", MAX_RECEIVE)]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as folder:
        db = f"sqlite:///{folder}/memory.db"
        plugin = FakePlugin(name="scale", sources=["scale"])
        await plugin.start()
        try:
            registry = _registry(db, "10s")
            try:
                async with grpc.aio.insecure_channel(registry.wait_ready(), options=options) as ch:
                    stub = pb_grpc.PluginRegistryStub(ch)
                    await _populate(stub, plugin.address, 0, count)
                    await asyncio.sleep(SETTLE_SECONDS)  # first checks, flushes
                    await _paged(stub, LARGEST_PAGE, count)  # the caches a restart warms
                    figures["fresh"] = registry.rss_mb()
                    figures["fresh_idle"] = await _idle_cpu(registry.proc.pid, idle_seconds)
            finally:
                registry.stop()
            registry = _registry(db, "10s")
            try:
                address = registry.wait_ready()
                figures["startup"] = registry.ready_at - registry.started
                async with grpc.aio.insecure_channel(address, options=options) as ch:
                    stub = pb_grpc.PluginRegistryStub(ch)
                    await _resumed(stub)
                    await asyncio.sleep(SETTLE_SECONDS)
                    await _paged(stub, LARGEST_PAGE, count)
                    figures["restart"] = registry.rss_mb()
                    figures["idle"] = await _idle_cpu(registry.proc.pid, idle_seconds)
                    await plugin.stop()
                    figures["idle_none"] = await _idle_cpu(registry.proc.pid, idle_seconds)
            finally:
                registry.stop()
        finally:
            await plugin.stop()
    idle_target = "≤ etcd's (about 8 ms/s)"
    return [
        row(f"start-up with {count:,} leased plugins", figures["startup"], 0, "≤ 2 s", unit="s"),
        row(
            f"RSS after restart vs fresh load, {count:,} leased plugins",
            figures["restart"],
            figures["fresh"],
            "≤ 1.20",
            unit="MB",
        ),
        row(
            f"idle CPU, {count:,} leased plugins checked every 10 s, fresh",
            figures["fresh_idle"],
            0,
            idle_target,
            unit="ms CPU/s",
        ),
        row(
            f"idle CPU, {count:,} leased plugins checked every 10 s, restarted",
            figures["idle"],
            0,
            idle_target,
            unit="ms CPU/s",
        ),
        row(
            f"idle CPU, {count:,} leased plugins at an address gone, restarted",
            figures["idle_none"],
            0,
            "-",
            unit="ms CPU/s",
        ),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for bench.run: 20,000 plugins (2,000 when ``quick``), then 10,000 (1,000)."""
    if quick:
        return asyncio.run(_scenario(2_000, 2.0)) + asyncio.run(_memory(1_000, 2.0))
    rows = asyncio.run(_scenario(20_000, IDLE_SECONDS))
    return rows + asyncio.run(_memory(10_000, MEMORY_IDLE_SECONDS))


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
