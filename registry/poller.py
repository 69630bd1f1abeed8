"""The health checker: calls each plugin's own ``Health`` and keeps its status.

Every plugin is checked right after it registers, then every interval (jittered),
each call with a deadline, at most ``concurrency`` at once, over one cached
channel per address. Hysteresis: ``unhealthy_threshold`` failures in a row make a
plugin UNHEALTHY, ``healthy_threshold`` successes make it HEALTHY again; the first
success takes an UNKNOWN plugin straight to HEALTHY.

Each cached channel is watched: when a READY connection breaks (the plugin died),
its plugins are re-checked at once and then every ``suspect_retry`` seconds until
they pass or reach the threshold, so a dead process stops being routable in well
under a second rather than after interval x threshold.

Status changes are written in batches (whatever finished meanwhile goes in one
revision); a check that changes no status is kept in memory and persisted lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from dataclasses import dataclass, field

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.client import open_channel
from registry.errors import RegistryUnavailable
from registry.model import Change, Plugin, PluginStatus, PluginType
from registry.state import RegistryState
from registry.wire import pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckSettings:
    interval: float = 10.0
    timeout: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    concurrency: int = 256
    suspect_retry: float = 0.1


@dataclass(slots=True)
class _Streak:
    successes: int = 0
    failures: int = 0
    suspect: bool = False


@dataclass(slots=True)
class _Channel:
    channel: grpc.aio.Channel
    ingestor: pb_grpc.IngestorPluginStub
    emitter: pb_grpc.EmitterPluginStub
    users: set[str] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None


class HealthChecker:
    """Owned by the server: ``start()`` after the state, ``stop()`` before it."""

    def __init__(self, state: RegistryState, settings: CheckSettings) -> None:
        self._state = state
        self._settings = settings
        self._streaks: dict[str, _Streak] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._channels: dict[str, _Channel] = {}
        # Which channel each checked plugin uses, so forgetting one touches one channel.
        self._address_of: dict[str, str] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, Plugin] = {}
        self._flush_wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._running = False
        state.subscribe(self._on_changes, on_reset=self._resync)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="health-flush")
        # After a restart, checks start spread over one interval: steady-state load,
        # not a burst of every registration at once.
        self._resync(spread=self._settings.interval)

    async def stop(self) -> None:
        """Cancel checks and close channels. Idempotent; safe before start."""
        self._running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = [*self._checks, *filter(None, [self._flusher])]
        tasks += [c.watcher for c in self._channels.values() if c.watcher is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._flusher = None
        channels, self._channels = self._channels, {}
        for entry in channels.values():
            await entry.channel.close()

    # -- scheduling ------------------------------------------------------------

    def _resync(self, spread: float = 0.0) -> None:
        """Track exactly the catalog's plugins (at start, and after a reload)."""
        current = {p.plugin_id for p in self._state.catalog}
        for plugin_id in set(self._streaks) - current:
            self._forget(plugin_id)
        for plugin_id in current - set(self._streaks):
            self._streaks[plugin_id] = _Streak()
            self._schedule(plugin_id, random.uniform(0, spread))

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            for plugin in change.removed:
                self._forget(plugin.plugin_id)
            for plugin in change.upserted:
                if plugin.plugin_id not in self._streaks:
                    self._streaks[plugin.plugin_id] = _Streak()
                    self._schedule(plugin.plugin_id, 0.0)

    def _schedule(self, plugin_id: str, delay: float) -> None:
        if not self._running:
            return
        old = self._timers.pop(plugin_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[plugin_id] = loop.call_later(delay, self._launch, plugin_id)

    def _launch(self, plugin_id: str) -> None:
        self._timers.pop(plugin_id, None)
        task = asyncio.create_task(self._check(plugin_id))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _forget(self, plugin_id: str) -> None:
        self._streaks.pop(plugin_id, None)
        self._pending.pop(plugin_id, None)
        timer = self._timers.pop(plugin_id, None)
        if timer is not None:
            timer.cancel()
        address = self._address_of.pop(plugin_id, None)
        entry = self._channels.get(address) if address is not None else None
        if address is not None and entry is not None:
            entry.users.discard(plugin_id)
            if not entry.users:
                self._close_channel(address)

    # -- checking --------------------------------------------------------------

    async def _check(self, plugin_id: str) -> None:
        try:
            async with self._semaphore:
                plugin = self._state.catalog.get(plugin_id)
                if plugin is None or plugin.status is PluginStatus.EXPIRED:
                    return  # gone, or its lease decides now: stop checking
                ok, error = await self._probe(plugin)
            self._record(plugin_id, ok, error)
        except Exception:
            log.exception("health check of %s failed", plugin_id)
        streak = self._streaks.get(plugin_id)
        if streak is not None:
            interval = self._settings.interval
            delay = (
                self._settings.suspect_retry
                if streak.suspect
                else interval * random.uniform(0.9, 1.1)
            )
            self._schedule(plugin_id, delay)

    async def _probe(self, plugin: Plugin) -> tuple[bool, str]:
        entry = self._channel(plugin)
        stub = entry.emitter if plugin.registration.type is PluginType.EMITTER else entry.ingestor
        try:
            response = await stub.Health(Empty(), timeout=self._settings.timeout)
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        if not response.healthy:
            return False, response.message or "plugin reports unhealthy"
        return True, ""

    def _record(self, plugin_id: str, ok: bool, error: str) -> None:
        plugin = self._state.catalog.get(plugin_id)
        streak = self._streaks.get(plugin_id)
        if plugin is None or streak is None or plugin.status is PluginStatus.EXPIRED:
            return
        settings = self._settings
        status = plugin.status
        if ok:
            streak.successes, streak.failures, streak.suspect = streak.successes + 1, 0, False
            if status is PluginStatus.UNKNOWN or (
                status is PluginStatus.UNHEALTHY and streak.successes >= settings.healthy_threshold
            ):
                status = PluginStatus.HEALTHY
        else:
            streak.successes, streak.failures = 0, streak.failures + 1
            if (
                status is not PluginStatus.UNHEALTHY
                and streak.failures >= settings.unhealthy_threshold
            ):
                status = PluginStatus.UNHEALTHY
            if status is PluginStatus.UNHEALTHY:
                streak.suspect = False
        now = self._state.clock()
        if status is plugin.status:
            self._state.touch(plugin_id, last_check_at=now, last_error=error)
        else:
            self._pending[plugin_id] = dataclasses.replace(
                plugin, status=status, last_check_at=now, last_error=error
            )
            self._flush_wake.set()

    async def _flush_loop(self) -> None:
        """Write pending status changes: all that finished meanwhile in one revision."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            pending, self._pending = self._pending, {}
            updates = []
            for plugin_id, wanted in pending.items():
                current = self._state.catalog.get(plugin_id)
                if current is not None and current.status is not PluginStatus.EXPIRED:
                    updates.append(
                        dataclasses.replace(
                            current,
                            status=wanted.status,
                            last_error=wanted.last_error,
                            last_check_at=wanted.last_check_at,
                        )
                    )
            try:
                await self._state.update(updates)
            except RegistryUnavailable as exc:
                log.warning("status changes not stored: %s", exc)
            except Exception:
                log.exception("status flush failed")

    # -- channels --------------------------------------------------------------

    def _channel(self, plugin: Plugin) -> _Channel:
        entry = self._channels.get(plugin.address)
        if entry is None:
            backoff = int(max(1.0, min(self._settings.interval, 5.0)) * 1000)
            channel = open_channel(
                plugin.address,
                [
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", backoff),
                ],
            )
            entry = _Channel(
                channel, pb_grpc.IngestorPluginStub(channel), pb_grpc.EmitterPluginStub(channel)
            )
            entry.watcher = asyncio.create_task(self._watch_channel(plugin.address, channel))
            self._channels[plugin.address] = entry
        entry.users.add(plugin.plugin_id)
        self._address_of[plugin.plugin_id] = plugin.address
        return entry

    async def _watch_channel(self, address: str, channel: grpc.aio.Channel) -> None:
        """Re-check an address's plugins at once when its live connection breaks."""
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            new = channel.get_state(try_to_connect=False)
            if (
                state is grpc.ChannelConnectivity.READY
                and new is not grpc.ChannelConnectivity.READY
            ):
                entry = self._channels.get(address)
                for plugin_id in list(entry.users if entry else ()):
                    streak = self._streaks.get(plugin_id)
                    if streak is not None:
                        streak.suspect = True
                        self._schedule(plugin_id, 0.0)
            state = new

    def _close_channel(self, address: str) -> None:
        entry = self._channels.pop(address)
        if entry.watcher is not None:
            entry.watcher.cancel()
        task = asyncio.create_task(entry.channel.close())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
