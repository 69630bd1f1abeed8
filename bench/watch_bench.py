"""Frozen Watch readers against the registry's memory (SPEC §7), measured from outside.

A registry process holds N plugins of ~16 KiB each (20,000 in the full run, 300 with
``--quick``): labels, description, capabilities and sources near their limits. Its
resident memory (``VmRSS``) is read twice, each time after one ListPlugins of all:

- baseline: once it has loaded the catalogue and its change log, with no watcher;
- ours: with 3 Watch client processes that read the first message of their snapshot
  and then stop themselves (SIGSTOP), so the registry's sends to them block.

The row's ratio is ours / baseline; SPEC §7 wants it within 1.30 (the hub used to pin
a copy of the snapshot per stopped stream: +355 MB each at 20,000). The plugins are
registered on a first registry process, which is then stopped, so the measured one
starts from the database without the garbage of 20,000 Registers.

    python -m bench.watch_bench [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import Process, python, row
from registry.wire import pb, pb_grpc

WATCHERS = 3
TARGET = "≤ 1.30"
DEADLINE = 60.0  # for any one wait; a broken run, not a measurement
OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]

# Reads the first message of a snapshot, says so, then stops itself: a hung client.
_FROZEN = """
import asyncio, os, signal, sys
import grpc
from registry.wire import pb, pb_grpc

async def main(address):
    async with grpc.aio.insecure_channel(address) as channel:
        async for message in pb_grpc.PluginRegistryStub(channel).Watch(pb.WatchRequest()):
            print(f"frozen after {len(message.upserted)} plugins", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

asyncio.run(main(sys.argv[1]))
"""

LABELS = {f"label-{i:02d}-" + "k" * 54: "v" * 256 for i in range(32)}
CAPABILITIES = [f"cap-{i:02d}-" + "c" * 57 for i in range(32)]


def _request(i: int) -> pb.RegisterRequest:
    name = f"big-{i:05d}"
    info = pb.PluginInfo(
        name=name,
        version="1.0.0",
        type=pb.PLUGIN_TYPE_INGESTOR,
        description="d" * 1024,
        sources=[f"{name}-{k:02d}-" + "s" * 115 for k in range(16)],
        capabilities=CAPABILITIES,
    )
    # Nothing listens on port 9: one failed check, then none for an hour.
    return pb.RegisterRequest(info=info, address="127.0.0.1:9", labels=LABELS, no_lease=True)


def _registry(db: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--health-interval", "1h", "--max-plugins", "100000"])


async def _populate(address: str, count: int) -> None:
    numbers = iter(range(count))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)

        async def worker() -> None:
            for i in numbers:
                response = await stub.Register(_request(i), timeout=DEADLINE)
                if not response.accepted:
                    raise RuntimeError(f"registration {i} refused: {response}")

        await asyncio.gather(*(worker() for _ in range(64)))


async def _list_all(stub: Any) -> int:
    """Page through ListPlugins of all; the number of plugins."""
    request = pb.ListPluginsRequest()
    count = 0
    while True:
        page = await stub.ListPlugins(request, timeout=DEADLINE)
        count += len(page.plugins)
        if not page.next_page_token:
            return count
        request.page_token = page.next_page_token


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


async def _frozen(address: str) -> Process:
    """A watcher process that has read one message and is stopped."""
    watcher = Process([python(), "-c", _FROZEN, address], r"(frozen after \d+)", stdout=True)
    await asyncio.to_thread(watcher.wait_ready, DEADLINE)
    deadline = time.perf_counter() + DEADLINE
    while _state(watcher.proc.pid) != "T":
        if time.perf_counter() > deadline:
            raise RuntimeError("the watcher did not stop itself")
        await asyncio.sleep(0.01)  # polling the process state, not synchronisation
    return watcher


def _kill(watcher: Process) -> None:
    if watcher.proc.poll() is None:
        watcher.proc.kill()  # SIGKILL ends a stopped process too
    watcher.proc.wait()


async def _measure(address: str, count: int, registry: Process) -> tuple[float, float]:
    """(RSS without, RSS with the frozen watchers), in MB."""
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)
        revision = (await stub.Resolve(pb.ResolveRequest(source="none"))).revision
        # A resume waits for the stored change log: its first answer says it is loaded.
        call = stub.Watch(pb.WatchRequest(since_revision=revision))
        await asyncio.wait_for(call.read(), DEADLINE)
        call.cancel()
        if await _list_all(stub) != count:
            raise RuntimeError("the registry does not hold every plugin")
        without = registry.rss_mb()
        watchers: list[Process] = []
        try:
            for _ in range(WATCHERS):
                watchers.append(await _frozen(address))
            await _list_all(stub)  # the same work as before "without"
            return without, registry.rss_mb()
        finally:
            for watcher in watchers:
                _kill(watcher)


async def _scenario(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="watch-bench-") as folder:
        db = f"sqlite:///{Path(folder) / 'registry.db'}"
        filling = _registry(db)
        try:
            await _populate(filling.wait_ready(), count)
        finally:
            filling.stop()
        registry = _registry(db)
        try:
            without, with_watchers = await _measure(registry.wait_ready(), count, registry)
        finally:
            registry.stop()
    return row(
        f"frozen watchers RSS ratio: {WATCHERS} SIGSTOPped, {count:,} plugins of 16 KiB",
        with_watchers,
        without,
        TARGET,
        unit="MB RSS",
    )


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for bench.run: 300 plugins when ``quick``, else 20,000."""
    return [asyncio.run(_scenario(300 if quick else 20_000))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="20,000 plugins (default 300)")
    args = parser.parse_args()
    from bench.run import print_table

    print_table(run(quick=not args.full))


if __name__ == "__main__":
    main()
