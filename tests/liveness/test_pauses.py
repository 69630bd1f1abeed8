"""SPEC §7 "Pauses do not evict": a registry stopped longer than a lease expires nobody.

The registry runs as its own process (``python -m registry serve``); plugins in this
process hold 2 s leases and heartbeat every 0.25 s. The registry is stopped with
SIGSTOP for 5 s (over two leases), then continued. Its reaper wakes 5 s late, takes
that for a pause, and gives every lease one TTL of grace from the resume: plugins
that heartbeat again keep their leases. The positive control is a plugin that stops
heartbeating at the resume: it expires, but only after the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from registry import PluginStatus, RegistryClient
from registry.errors import RegistryError
from registry.testing import FakePlugin

from .conftest import DEADLINE, eventually, plugin_info, recording, steps

TTL = 2
BEAT = 0.25
PAUSE = 5.0  # how long the registry stays stopped: over two leases
SERVING = re.compile(r"serving on (\S+)")
PAUSED = re.compile(r"paused or starved for (\d+\.\d)s")
EXPIRED, HEALTHY = PluginStatus.EXPIRED, PluginStatus.HEALTHY


@dataclass
class Registry:
    """A ``registry serve`` child process and everything it printed."""

    process: asyncio.subprocess.Process
    address: str = ""
    lines: list[str] = field(default_factory=list)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@contextlib.asynccontextmanager
async def registry_process(folder: Path, *args: str) -> AsyncIterator[Registry]:
    """Start ``python -m registry serve`` on 127.0.0.1:0; continued, killed and reaped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLKU_REGISTRY")}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "registry", "serve", "--listen", "127.0.0.1:0"),
        *("--db", f"sqlite:///{folder / 'registry.db'}", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    registry = Registry(process)
    serving = asyncio.Event()

    async def drain() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            registry.lines.append(line)
            if not registry.address and (match := SERVING.search(line)):
                registry.address = match.group(1)
                serving.set()

    reader = asyncio.create_task(drain())
    try:
        await asyncio.wait_for(serving.wait(), DEADLINE * 4)
        yield registry
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.kill()
        await process.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


@dataclass
class Beats:
    """Heartbeat results per plugin id: (when it was sent, acknowledged or the error)."""

    sent: dict[str, list[tuple[datetime, bool | str]]] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)

    def after(self, plugin_id: str, moment: datetime) -> list[bool | str]:
        return [result for at, result in self.sent[plugin_id] if at >= moment]


@contextlib.asynccontextmanager
async def heartbeating(client: RegistryClient, plugin_ids: Iterable[str]) -> AsyncIterator[Beats]:
    """Heartbeat each plugin every BEAT seconds (a plugin's own timer), until told to stop."""
    beats = Beats()

    async def beat(plugin_id: str) -> None:
        results = beats.sent.setdefault(plugin_id, [])
        while plugin_id not in beats.stopped:
            at = datetime.now(UTC)
            try:
                results.append((at, await client.heartbeat(plugin_id)))
            except RegistryError as exc:  # a stopped registry: the call times out
                results.append((at, str(exc)))
            await asyncio.sleep(BEAT)  # the heartbeat period, not synchronisation

    tasks = [asyncio.create_task(beat(plugin_id)) for plugin_id in plugin_ids]
    try:
        yield beats
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_stopped_registry_expires_no_lease_on_resume(tmp_path):
    async with (
        registry_process(tmp_path, "--health-interval", "1h") as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address, timeout=2.0) as client,
        recording(client) as watch,
    ):

        async def leased(name: str) -> str:
            response = await client.register(
                plugin_info(name), plugin.address, lease_ttl_seconds=TTL
            )
            return response.plugin_id

        kept = [await leased(f"kept-{i}") for i in range(5)]
        silent = await leased("silent")
        async with heartbeating(client, [*kept, silent]) as beats:
            await watch.wait_for(
                lambda ms: all(HEALTHY in steps(ms, i) for i in [*kept, silent]),
                what="every plugin HEALTHY",
            )
            registry.signal(signal.SIGSTOP)
            await asyncio.sleep(PAUSE)  # the length of the pause under test
            beats.stopped.add(silent)  # the control goes silent from the resume on
            resumed = datetime.now(UTC)
            registry.signal(signal.SIGCONT)

            # The control expires one TTL after the resume, not at it.
            await watch.wait_for(
                lambda ms: EXPIRED in steps(ms, silent), within=DEADLINE, what="silent to expire"
            )
            assert datetime.now(UTC) - resumed >= timedelta(seconds=TTL)
            # A second control, registered after the resume: when it has expired, the
            # kept plugins have lived more than two TTLs past the resume.
            later = await leased("later-control")
            await watch.wait_for(
                lambda ms: EXPIRED in steps(ms, later), what="the later control to expire"
            )

            for plugin_id in kept:
                assert EXPIRED not in steps(watch.messages, plugin_id), plugin_id
                after = beats.after(plugin_id, resumed + timedelta(seconds=TTL))
                assert after, plugin_id
                assert all(result is True for result in after), (plugin_id, after)
        for plugin_id in kept:
            assert PluginStatus((await client.get_plugin(plugin_id)).status) is HEALTHY

        # The registry said what it saw, once: a pause about as long as the stop.
        def pauses() -> list[float]:
            return [float(m.group(1)) for line in registry.lines if (m := PAUSED.search(line))]

        await eventually(pauses, what="the pause warning")
        assert len(pauses()) == 1, registry.lines
        assert pauses()[0] >= PAUSE - 1
