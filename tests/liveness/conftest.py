"""Helpers of the liveness tests: waiting on conditions, recording Watch streams, crashable plugins.

Nothing here sleeps to synchronise: :func:`eventually` polls a condition every 10 ms
until a deadline (a failure bound, never a timing assertion), and
:class:`WatchRecorder` wakes its waiters on every message it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from registry import PluginStatus, RegistryClient, testing
from registry.wire import pb

T = TypeVar("T")

POLL = 0.01
# How long an "eventually" may take before the test fails. Generous on purpose: the
# suite runs on two busy cores, and these bound failures, they do not measure anything.
DEADLINE = 15.0


def plugin_info(name: str, sources: Iterable[str] = (), *, description: str = "") -> pb.PluginInfo:
    """An ingestor's PluginInfo; its source defaults to its name."""
    return pb.PluginInfo(
        name=name,
        version="1.0.0",
        type=pb.PLUGIN_TYPE_INGESTOR,
        description=description,
        sources=list(sources) or [name],
    )


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = DEADLINE, what: str = "condition"
) -> T:
    """:func:`registry.testing.eventually` with this suite's deadline."""
    result: T = await testing.eventually(probe, within=within, what=what, interval=POLL)
    return result


async def status_of(client: RegistryClient, plugin_id: str) -> PluginStatus:
    return PluginStatus((await client.get_plugin(plugin_id)).status)


async def wait_status(
    client: RegistryClient, plugin_id: str, status: PluginStatus
) -> pb.RegisteredPlugin:
    """Poll GetPlugin until the plugin has ``status``; return it."""

    async def probe() -> pb.RegisteredPlugin | None:
        plugin = await client.get_plugin(plugin_id)
        return plugin if plugin.status == int(status) else None

    found = await eventually(probe, what=f"{plugin_id} to be {status.name}")
    assert found is not None
    return found


async def resolved_ids(client: RegistryClient, source: str) -> set[str]:
    return {e.plugin_id for e in (await client.resolve(source=source)).endpoints}


async def current_revision(client: RegistryClient) -> int:
    """The registry's revision now (Resolve reports it with any answer)."""
    return (await client.resolve(source="no-such-source")).revision


def history(messages: Iterable[pb.WatchResponse], plugin_id: str) -> list[tuple[int, PluginStatus]]:
    """(revision, status) of each upsert of one plugin in the deltas seen."""
    return [
        (message.revision, PluginStatus(plugin.status))
        for message in messages
        if not message.snapshot
        for plugin in message.upserted
        if plugin.plugin_id == plugin_id
    ]


def is_progress(message: pb.WatchResponse) -> bool:
    """A progress message: the current revision and no change."""
    return not message.snapshot and not message.upserted and not message.removed_plugin_ids


@dataclass(frozen=True)
class Event:
    """One step of one plugin as a watcher sees it: a status, or its removal."""

    revision: int
    plugin_id: str
    status: PluginStatus | None  # None: removed

    def __repr__(self) -> str:
        what = self.status.name if self.status is not None else "REMOVED"
        return f"<r{self.revision} {self.plugin_id[-6:]} {what}>"


def events(messages: Iterable[pb.WatchResponse]) -> list[Event]:
    """Each delta's upserts and removals in order (snapshots and progress left out)."""
    out = []
    for message in messages:
        if message.snapshot:
            continue
        for plugin in message.upserted:
            out.append(Event(message.revision, plugin.plugin_id, PluginStatus(plugin.status)))
        for plugin_id in message.removed_plugin_ids:
            out.append(Event(message.revision, plugin_id, None))
    return out


def steps(messages: Iterable[pb.WatchResponse], plugin_id: str) -> list[PluginStatus | None]:
    """One plugin's statuses in the order a watcher saw them; None for its removal."""
    return [e.status for e in events(messages) if e.plugin_id == plugin_id]


class WatchRecorder:
    """Reads one Watch stream in the background and keeps every message.

    ``await recorder.wait_for(predicate)`` returns as soon as a received message
    makes ``predicate(messages)`` true.
    """

    def __init__(
        self, client: RegistryClient, *, since_revision: int = 0, sources: Iterable[str] = ()
    ) -> None:
        self.messages: list[pb.WatchResponse] = []
        self.error: BaseException | None = None
        self.ended = False
        self._changed = asyncio.Condition()
        self._stream = cast(
            AsyncGenerator[pb.WatchResponse, None],
            client.watch(since_revision=since_revision, sources=list(sources)),
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._stream:
                async with self._changed:
                    self.messages.append(message)
                    self._changed.notify_all()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended = True
            async with self._changed:
                self._changed.notify_all()

    @property
    def deltas(self) -> list[pb.WatchResponse]:
        """The change messages received (no snapshot, no progress)."""
        return [m for m in self.messages if not m.snapshot and not is_progress(m)]

    async def wait_for(
        self,
        predicate: Callable[[list[pb.WatchResponse]], object],
        *,
        within: float = DEADLINE,
        what: str = "a watch message",
    ) -> list[pb.WatchResponse]:
        """Wait until ``predicate(messages)`` holds; return the messages so far.

        Raises:
            AssertionError: the deadline passed or the stream ended first.
        """

        def done() -> bool:
            return bool(predicate(self.messages)) or self.ended

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(done), within)
            except TimeoutError:
                raise AssertionError(
                    f"timed out after {within}s waiting for {what}; got {events(self.messages)}"
                ) from None
        if not predicate(self.messages):
            raise AssertionError(f"watch ended ({self.error!r}) before {what}")
        return self.messages

    async def wait_revision(self, revision: int) -> None:
        await self.wait_for(lambda ms: ms and ms[-1].revision >= revision, what=f"r{revision}")

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._stream.aclose()


@contextlib.asynccontextmanager
async def recording(
    client: RegistryClient, *, since_revision: int = 0, sources: Iterable[str] = ()
) -> AsyncIterator[WatchRecorder]:
    """A :class:`WatchRecorder`; from revision 0 it has its snapshot before this yields."""
    recorder = WatchRecorder(client, since_revision=since_revision, sources=sources)
    try:
        if not since_revision:
            await recorder.wait_for(bool, what="the snapshot")
        yield recorder
    finally:
        await recorder.close()


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Continue (if stopped), kill and wait for a child process, whatever state it is in."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.kill()
    await process.wait()


@dataclass
class PluginProcess:
    """A FakePlugin in its own process (``python -m registry.testing``)."""

    process: asyncio.subprocess.Process
    address: str

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@contextlib.asynccontextmanager
async def plugin_process(name: str, source: str) -> AsyncIterator[PluginProcess]:
    """Start a fake plugin process and wait until it listens; kill it on exit.

    Whatever the test did to it (SIGSTOP included), it is continued, killed and reaped.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry.testing",
        "--name",
        name,
        "--source",
        source,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
        text = line.decode().strip()
        assert text.startswith("listening on "), f"plugin process said {text!r}"
        yield PluginProcess(process, text.removeprefix("listening on "))
    finally:
        await _reap(process)


# A Watch client that reads its snapshot, then stops itself (SIGSTOP) before reading
# anything else: its socket stops being read, as with a hung or partitioned client.
# Once continued, it prints each message it gets as a JSON line, progress left out.
_STALLED_WATCHER = """
import asyncio, json, os, signal, sys
from registry import RegistryClient

async def main(address):
    async with RegistryClient(address) as client:
        first = True
        async for m in client.watch():
            if m.snapshot or m.upserted or m.removed_plugin_ids:
                line = {
                    "revision": m.revision,
                    "snapshot": m.snapshot,
                    "upserted": [p.plugin_id for p in m.upserted],
                    "removed": list(m.removed_plugin_ids),
                }
                print(json.dumps(line), flush=True)
            if first:
                first = False
                os.kill(os.getpid(), signal.SIGSTOP)

asyncio.run(main(sys.argv[1]))
"""


@dataclass
class WatcherProcess:
    """A Watch client in its own process that stopped right after its snapshot."""

    process: asyncio.subprocess.Process
    snapshot: dict[str, Any]

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    async def next_message(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), DEADLINE)
        assert line, "the watcher process ended"
        message: dict[str, Any] = json.loads(line)
        return message


@contextlib.asynccontextmanager
async def stalled_watcher(address: str) -> AsyncIterator[WatcherProcess]:
    """Start :data:`_STALLED_WATCHER`; continued, killed and reaped on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STALLED_WATCHER, address, stdout=asyncio.subprocess.PIPE
    )
    try:
        watcher = WatcherProcess(process, {})
        watcher.snapshot = await watcher.next_message()
        assert watcher.snapshot["snapshot"], watcher.snapshot
        yield watcher
    finally:
        await _reap(process)
