"""Checks behind a hanging plugin: how fast a new plugin is HEALTHY and a killed one unroutable.

SPEC §7 "Work does not depend on a hanging peer" and the §5 row "Plugin killed with
SIGKILL → no longer routable ≤ 1 s ... also while 3,000 other registrations point at a
plugin whose Health hangs". Every server is a subprocess, the registry at its default
check settings (interval 10 s, timeout 2 s, suspect retry 0.1 s); the client runs here.
Two figures from the same run, in milliseconds, median of a few tries each:

- ours: with N registrations (3,000; 300 with ``--quick``) at one plugin process whose
  ``Health`` never answers, registered just before measuring, so every one of their
  checks is due at the same time (the worst moment).
- baseline: the same registry without them.

Scenarios: a new healthy plugin (an in-process FakePlugin), from its Register answer
until a Watch stream shows it HEALTHY; a plugin process (``python -m registry.testing``)
that was HEALTHY, from its SIGKILL until a Watch stream shows it no longer HEALTHY.
Target: as fast as without the hanging registrations (ratio ≤ 1.2), and for SIGKILL also
the §5 absolute ≤ 1 s. Prints numbers, never verdicts.

    python -m bench.isolation_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

from bench.common import Process, python, row
from registry.client import RegistryClient
from registry.testing import FakePlugin
from registry.wire import pb

HEALTHY = pb.PLUGIN_STATUS_HEALTHY
DEADLINE = 120.0  # gives up on one wait that takes longer (a broken run)

# A plugin process whose Health never answers; it keeps its connections open.
_HANGING = """
import asyncio
import grpc
from registry.wire import pb_grpc

class Hanging(pb_grpc.IngestorPluginServicer):
    async def Health(self, request, context):
        await asyncio.Event().wait()

async def main():
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_IngestorPluginServicer_to_server(Hanging(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def _info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(
        name=name,
        version="1.0.0",
        type=pb.PLUGIN_TYPE_INGESTOR,
        sources=[name],
    )


@contextlib.contextmanager
def _process(args: list[str], pattern: str, *, stdout: bool = False) -> Any:
    process = Process(args, pattern, stdout=stdout)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


async def _register_hanging(client: RegistryClient, address: str, count: int) -> None:
    """``count`` registrations (distinct names) at ``address``, 64 in flight."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await client.register(_info(f"hang-{i}"), address, no_lease=True)

    await asyncio.gather(*(worker() for _ in range(64)))


@contextlib.asynccontextmanager
async def _watching(
    client: RegistryClient, source: str
) -> AsyncIterator[AsyncGenerator[pb.WatchResponse, None]]:
    """A Watch stream of one source, past its snapshot."""
    stream = cast(AsyncGenerator[pb.WatchResponse, None], client.watch(sources=[source]))
    try:
        await anext(stream)  # the snapshot
        yield stream
    finally:
        await stream.aclose()


async def _until(stream: AsyncIterator[pb.WatchResponse], plugin_id: str, *, healthy: bool) -> None:
    """Read ``stream`` until it shows ``plugin_id`` HEALTHY (or, not healthy: otherwise)."""
    async with asyncio.timeout(DEADLINE):
        async for message in stream:
            if not healthy and plugin_id in message.removed_plugin_ids:
                return
            for plugin in message.upserted:
                if plugin.plugin_id == plugin_id and (plugin.status == HEALTHY) == healthy:
                    return


async def _to_healthy(client: RegistryClient, plugin: FakePlugin, name: str) -> float:
    """Seconds from a new plugin's Register answer until Watch shows it HEALTHY."""
    async with _watching(client, name) as stream:
        plugin_id = (await client.register(_info(name), plugin.address, no_lease=True)).plugin_id
        began = time.perf_counter()
        await _until(stream, plugin_id, healthy=True)
        return time.perf_counter() - began


async def _to_unroutable(client: RegistryClient, name: str) -> float:
    """Seconds from a HEALTHY plugin process's SIGKILL until Watch shows it not HEALTHY."""
    args = [python(), "-m", "registry.testing", "--name", name, "--source", name]
    with _process(args, r"listening on (\S+)", stdout=True) as process:
        async with _watching(client, name) as stream:
            registered = await client.register(_info(name), process.address, no_lease=True)
            await _until(stream, registered.plugin_id, healthy=True)
            began = time.perf_counter()
            process.proc.kill()
            await _until(stream, registered.plugin_id, healthy=False)
            return time.perf_counter() - began


async def _side(db: str, hanging: str | None, count: int, tries: int) -> tuple[float, float]:
    """Median seconds (to HEALTHY, to unroutable) on a fresh registry at its defaults."""
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    with _process(args, r"serving on (\S+)") as registry:
        async with RegistryClient(registry.address, timeout=60.0) as client, FakePlugin() as fake:
            if hanging is not None:
                await _register_hanging(client, hanging, count)
            healthy = [await _to_healthy(client, fake, f"new-{i}") for i in range(tries)]
            killed = [await _to_unroutable(client, f"doomed-{i}") for i in range(tries)]
    return statistics.median(healthy), statistics.median(killed)


async def _scenario(count: int, tries: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="isolation-bench-") as folder:
        base = Path(folder)
        without = await _side(f"sqlite:///{base / 'without.db'}", None, count, tries)
        with _process([python(), "-c", _HANGING], r"listening on (\S+)", stdout=True) as hang:
            with_ = await _side(f"sqlite:///{base / 'with.db'}", hang.address, count, tries)
    what = f"{count:,} registrations at a plugin whose Health hangs vs none"
    return [
        row(f"new plugin → HEALTHY, {what}", with_[0] * 1000, without[0] * 1000, "≤ 1.2", "ms"),
        row(
            f"SIGKILL → unroutable, {what}",
            with_[1] * 1000,
            without[1] * 1000,
            "≤ 1.2; ours ≤ 1000 ms",
            "ms",
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for bench.run: 300 registrations at the hanging plugin if ``quick``, else 3,000."""
    return asyncio.run(_scenario(300, 3) if quick else _scenario(3_000, 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 registrations, 3 tries")
    args = parser.parse_args()
    from bench.run import print_table

    print_table(run(quick=args.quick))


if __name__ == "__main__":
    main()
