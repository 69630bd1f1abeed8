"""The health checker: calls each plugin's own ``Health`` and keeps its status.

Every plugin is checked right after it registers, then every interval (jittered),
each call with a deadline, over one cached channel per address. Hysteresis:
``unhealthy_threshold`` failures in a row make a plugin UNHEALTHY,
``healthy_threshold`` successes make it HEALTHY again; the first success takes an
UNKNOWN plugin straight to HEALTHY.

The first check of a registration is made before it is stored (:meth:`HealthChecker.
first_check`, called by Register on the leader once every cheap refusal is past), by
the same path as any check: the address vetted, the cached channel, a fast-lane slot.
Its result is folded into the registration's one change (HEALTHY, or its error), and the
next check comes at the interval. Registrations at one address and type share that call.
When it does not answer within Register's short wait (or no fast-lane slot is free) the
plugin is stored UNKNOWN, and the call still in flight gives it its first result when it
ends (else it is checked at once, as before).

Isolation (SPEC §7 "Work does not depend on a hanging peer"): a check that comes due
joins the *lane* of its plugin's address and type, never a queue shared by every
plugin. A lane has at most ``per_address`` calls in flight; checks that come due while
it is at that bound wait in the lane as one group and share the next call's answer.
The Health request is empty and carries no plugin identity, so every registration at
one address and type is asked the very same question of the very same process: one
answer serves them all, whatever their names. So 3,000 registrations at a plugin whose
Health hangs cost one timeout per call, a handful of calls in flight, and no slot that
anyone else waits for. ``concurrency`` bounds the regular calls in flight over all
lanes (it counts calls to addresses, never plugins); first checks of new registrations
and re-checks after a broken channel go by a *fast lane*, at most one call per lane and
``fast_lane`` in total, so they never wait behind regular rounds. Whatever waits is
bounded: a plugin is at most once in one lane (or in one call), and a lane is at most
once in the queue for a slot.

Each cached channel is watched: when a READY connection breaks (the plugin died),
its plugins are re-checked at once and then every ``suspect_retry`` seconds until
they pass or reach the threshold, so a dead process stops being routable in well
under a second rather than after interval x threshold.

Status changes are written in batches (whatever finished meanwhile goes in one
revision); a check that changes no status is kept in memory and persisted lazily.

A DRAINING plugin (SPEC §9) is checked like any other, its ``last_check_at`` and
``last_error`` recorded, but its status is the operator's: no result changes it, and
a failing one is not retried faster than the interval once past the threshold.
Undrained to UNKNOWN (its last check did not pass), it is checked again at once.

Every channel is made to a vetted target (SPEC §6 "Address policy"): the stored address
is parsed and judged by the address policy, a host name resolved, and the channel goes
to the vetted IP. A refused or unparsable address is never dialled; that check fails
with "refused by the address policy". A cached channel whose live connection broke is
dropped, so the next check vets and resolves again. ``last_error`` is in fixed words
per outcome and never carries what the peer sent, except a plugin's own unhealthy
message, made printable and cut to :data:`MAX_PLUGIN_MESSAGE` characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.catalog import FirstCheck
from registry.errors import InvalidArgument, RegistryUnavailable
from registry.model import Change, Plugin, PluginStatus, PluginType
from registry.state import RegistryState
from registry.timers import SlottedTimers
from registry.trust.addresses import (
    AddressPolicy,
    AddressRefused,
    DialTarget,
    HostResolver,
    SystemResolver,
)
from registry.trust.dial import PluginCredentials, PluginDialer
from registry.wire import pb_grpc

log = logging.getLogger(__name__)

# How much of a plugin's own "unhealthy" message last_error keeps.
MAX_PLUGIN_MESSAGE = 256
# A passing first check at an address stands for registrations there this much later:
# a burst of registrations at one plugin server costs a few Health calls, not one each.
FIRST_CHECK_FRESH = 0.05  # seconds
MAX_FRESH = 1024  # addresses whose last passing first check is remembered

# A lane: the checks of one address and plugin type (one process, one question).
_Key = tuple[str, PluginType]


def _loopback_only() -> AddressPolicy:
    return AddressPolicy.default("127.0.0.1:0")


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """How plugins are checked. Durations are in seconds.

    ``concurrency`` bounds the regular Health calls in flight in total, ``per_address``
    those to one address (and plugin type), ``fast_lane`` the first checks and
    broken-channel re-checks in flight, which never wait for a regular slot.
    ``address_policy`` decides which addresses are dialled (default: loopback only),
    ``resolver`` resolves host names before each new channel, ``plugin_tls`` verifies
    ``https://`` plugins (None: the system roots). ``on_check(seconds, result)`` hears of
    every Health call's end: ``healthy``, ``unhealthy`` (answered so) or ``failed``.

    Raises (constructor):
        ValueError: a bound is below 1.
    """

    interval: float = 10.0
    timeout: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    concurrency: int = 256
    per_address: int = 4
    fast_lane: int = 64
    suspect_retry: float = 0.1
    address_policy: AddressPolicy = field(default_factory=_loopback_only)
    resolver: HostResolver = field(default_factory=SystemResolver)
    plugin_tls: PluginCredentials | None = None
    on_check: Callable[[float, str], None] | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_address", "fast_lane"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(slots=True)
class _Streak:
    successes: int = 0
    failures: int = 0
    suspect: bool = False
    # Never checked since it registered: its first check goes by the fast lane.
    first: bool = False
    # Part of a call in flight: that call's end schedules its next check.
    busy: bool = False
    # The lane it was last queued in (its address and type never change).
    key: _Key | None = None


@dataclass(slots=True)
class _Lane:
    """The checks of one address and type: who waits for a call, what is in flight."""

    waiting: set[str] = field(default_factory=set)
    urgent: set[str] = field(default_factory=set)
    calls: int = 0  # regular calls in flight, at most per_address
    urgent_calls: int = 0  # fast-lane calls in flight, at most one
    pump_due: bool = False

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.urgent or self.calls or self.urgent_calls)


@dataclass(slots=True)
class _Channel:
    channel: grpc.aio.Channel
    target: DialTarget
    ingestor: pb_grpc.IngestorPluginStub
    emitter: pb_grpc.EmitterPluginStub
    users: set[str] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None
    closed: bool = False


class _Refused(Exception):
    """The address is not dialled; ``error`` is the check's last_error."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class HealthChecker:
    """Owned by the server: ``start()`` after the state, ``stop()`` before it.

    ``calls`` counts the Health calls made and ``results`` the check results recorded
    (one per plugin a call served); benchmarks and tests read them, with
    :attr:`in_flight` and :attr:`waiting`.
    """

    def __init__(self, state: RegistryState, settings: CheckSettings) -> None:
        self._state = state
        self._settings = settings
        self._streaks: dict[str, _Streak] = {}
        # Every plugin's next check, on one loop timer; due ones come in batches.
        self._timers: SlottedTimers[str] = SlottedTimers(self._due_batch)
        self._channels: dict[str, _Channel] = {}
        self._dialer = PluginDialer(settings.address_policy, settings.resolver, settings.plugin_tls)
        # One vetting (parse, policy, DNS) in flight per address, shared by its checks.
        self._vetting: dict[str, asyncio.Task[DialTarget]] = {}
        self._lanes: dict[_Key, _Lane] = {}
        # Free slots, and the lanes waiting for one in arrival order (each at most once).
        self._free = settings.concurrency
        self._urgent_free = settings.fast_lane
        self._ready: dict[_Key, None] = {}
        self._urgent_ready: dict[_Key, None] = {}
        self._checks: set[asyncio.Task[None]] = set()
        # First checks of registrations not stored yet, one call per lane at most; the
        # plugins stored meanwhile (the wait ran out) that take its result; how many
        # registrations are inside first_check() per address (their channel is kept).
        self._first: dict[_Key, asyncio.Task[tuple[bool, str]]] = {}
        self._late: dict[_Key, list[str]] = {}
        # The loop time of each address's last passing first check (FIRST_CHECK_FRESH).
        self._fresh: dict[_Key, float] = {}
        self._holding: dict[str, int] = {}
        self._pending: dict[str, Plugin] = {}
        self._flush_wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._running = False
        self.calls = 0
        self.results = 0
        state.subscribe(self._on_changes, on_reset=self._resync)

    @property
    def in_flight(self) -> int:
        """Health calls in flight now, fast lane included."""
        return sum(lane.calls + lane.urgent_calls for lane in self._lanes.values())

    @property
    def waiting(self) -> int:
        """Checks that are due and wait in their lane (at most one per plugin)."""
        return sum(len(lane.waiting) + len(lane.urgent) for lane in self._lanes.values())

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        # Whatever was tracked while stopped (a follower's changes) is scheduled afresh.
        self._timers.clear()
        self._streaks.clear()
        self._flusher = asyncio.create_task(self._flush_loop(), name="health-flush")
        # After a restart, checks start spread over one interval: steady-state load,
        # not a burst of every registration at once.
        self._resync(spread=self._settings.interval)

    async def stop(self) -> None:
        """Cancel checks and close channels. Idempotent; safe before start."""
        self._running = False
        self._timers.clear()
        tasks: list[asyncio.Task[Any]] = [*self._checks, *self._first.values()]
        tasks += filter(None, [self._flusher])
        tasks += [c.watcher for c in self._channels.values() if c.watcher is not None]
        vetting, self._vetting = list(self._vetting.values()), {}
        for task in [*tasks, *vetting]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*vetting, return_exceptions=True)
        self._flusher = None
        self._late.clear()
        self._fresh.clear()
        self._lanes.clear()
        self._ready.clear()
        self._urgent_ready.clear()
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
            if change.removed:
                # A registration that replaces an instance at its address keeps the
                # channel: it uses it before the old one is forgotten.
                self._adopt_channels(change.upserted)
            for plugin in change.removed:
                self._forget(plugin.plugin_id)
            for plugin in change.upserted:
                streak = self._streaks.get(plugin.plugin_id)
                if streak is None:
                    self._track(plugin)
                elif plugin.status is PluginStatus.UNKNOWN and not streak.first:
                    # Back to UNKNOWN only by an undrain: check it at once, by the fast
                    # lane (a call in flight reschedules it when it ends).
                    streak.first = True
                    if not streak.busy:
                        self._schedule(plugin.plugin_id, 0.0)

    def check_now(self, plugin_ids: Iterable[str]) -> None:
        """Check these plugins at once, by the fast lane (a KeepAlive stream broke).

        Each is a suspect until a check passes (retried every ``suspect_retry`` up to
        the threshold), as when its channel broke. Ids not tracked are ignored; one in
        a call now is checked again when that call ends. A no-op while stopped (a
        follower checks nothing: the leader's leases decide there).
        """
        for plugin_id in plugin_ids:
            streak = self._streaks.get(plugin_id)
            if streak is None:
                continue
            streak.suspect = True
            if not streak.busy:
                self._schedule(plugin_id, 0.0)

    def _track(self, plugin: Plugin) -> None:
        """Start checking a new instance: at the interval when its first check was
        folded into its registration, else at once (or by the first check in flight)."""
        plugin_id = plugin.plugin_id
        key = (plugin.address, plugin.registration.type)
        streak = self._streaks[plugin_id] = _Streak(first=True, key=key)
        entry = self._adopt_channels((plugin,))
        if plugin.last_check_at is not None:
            # Checked as it registered (first_check): the next check is a regular one.
            streak.first = False
            streak.successes, streak.failures = (0, 1) if plugin.last_error else (1, 0)
            if entry is None and not plugin.last_error:
                # It passed, but that channel is gone since (its connection broke, or
                # it was closed): a suspect, as if it had broken under it.
                streak.suspect = True
                self._schedule(plugin_id, 0.0)
            else:
                self._schedule(plugin_id, self._settings.interval * random.uniform(0.9, 1.1))
            return
        task = self._first.get(key)
        if task is not None and not task.done():
            # Its first check is in flight still (Register's wait ran out): its end
            # records the result and schedules the next check, as a call's end does.
            streak.busy = True
            self._late.setdefault(key, []).append(plugin_id)
            return
        self._schedule(plugin_id, 0.0)

    def _adopt_channels(self, plugins: tuple[Plugin, ...]) -> _Channel | None:
        """Make new instances users of the cached channel of their address, if any.

        Returns the last one's channel (None: none cached)."""
        entry = None
        for plugin in plugins:
            entry = self._channels.get(plugin.address)
            if entry is not None:
                entry.users.add(plugin.plugin_id)
        return entry

    def _schedule(self, plugin_id: str, delay: float) -> None:
        if not self._running:
            return
        # Put off by at most 0.1 s (a tenth of a short delay) to share a slot, so
        # that checks due close together make one call per lane (registry.timers).
        self._timers.schedule(plugin_id, delay)

    def _due_batch(self, plugin_ids: list[str]) -> None:
        for plugin_id in plugin_ids:
            self._due(plugin_id)

    def _due(self, plugin_id: str) -> None:
        """A check is due: queue the plugin in its lane (once), by the fast lane if urgent."""
        self._timers.cancel(plugin_id)
        streak = self._streaks.get(plugin_id)
        if streak is None or streak.busy:
            return  # gone, or in a call now, whose end schedules the next check
        plugin = self._state.catalog.get(plugin_id)
        if plugin is None or plugin.status is PluginStatus.EXPIRED:
            return  # gone, or its lease decides now: stop checking
        key = (plugin.address, plugin.registration.type)
        streak.key = key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if streak.first or streak.suspect:
            lane.waiting.discard(plugin_id)
            lane.urgent.add(plugin_id)
        elif plugin_id not in lane.urgent:
            lane.waiting.add(plugin_id)
        if not lane.pump_due:
            # Checks due in the same loop iteration (a broken channel's plugins,
            # suspects retried together) go out as one call.
            lane.pump_due = True
            asyncio.get_running_loop().call_soon(self._pump, key)

    def _pump(self, key: _Key) -> None:
        """Start what the lane may start now; queue it for a slot when there is none."""
        lane = self._lanes.get(key)
        if lane is None or not self._running:
            return
        lane.pump_due = False
        if lane.urgent and not lane.urgent_calls:
            if self._urgent_free:
                self._urgent_free -= 1
                self._urgent_ready.pop(key, None)
                self._start(key, lane, urgent=True)
            else:
                self._urgent_ready.setdefault(key)
        if lane.waiting and lane.calls < self._settings.per_address:
            if self._free:
                self._free -= 1
                self._ready.pop(key, None)
                self._start(key, lane, urgent=False)
            else:
                self._ready.setdefault(key)
        if lane.idle:
            self._drop_lane(key)

    def _drop_lane(self, key: _Key) -> None:
        del self._lanes[key]
        self._ready.pop(key, None)
        self._urgent_ready.pop(key, None)

    def _release(self, *, urgent: bool) -> None:
        """Give a freed slot to the lanes that wait for one, first come first served."""
        ready = self._urgent_ready if urgent else self._ready
        if urgent:
            self._urgent_free += 1
        else:
            self._free += 1
        while ready and (self._urgent_free if urgent else self._free):
            key = next(iter(ready))
            del ready[key]
            self._pump(key)

    def _start(self, key: _Key, lane: _Lane, *, urgent: bool) -> None:
        if urgent:
            group, lane.urgent = lane.urgent, set()
            lane.urgent_calls += 1
        else:
            group, lane.waiting = lane.waiting, set()
            lane.calls += 1
        for plugin_id in group:
            self._streaks[plugin_id].busy = True
        task = asyncio.create_task(self._call(key, lane, group, urgent), name="health-check")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _forget(self, plugin_id: str) -> None:
        streak = self._streaks.pop(plugin_id, None)
        self._pending.pop(plugin_id, None)
        self._timers.cancel(plugin_id)
        if streak is None or streak.key is None:
            return
        lane = self._lanes.get(streak.key)
        if lane is not None:
            lane.waiting.discard(plugin_id)
            lane.urgent.discard(plugin_id)
            if lane.idle:
                self._drop_lane(streak.key)
        address = streak.key[0]
        entry = self._channels.get(address)
        if entry is not None and plugin_id in entry.users:
            entry.users.discard(plugin_id)
            if not entry.users:
                self._close_channel(address)

    # -- checking --------------------------------------------------------------

    async def _call(self, key: _Key, lane: _Lane, group: set[str], urgent: bool) -> None:
        """One Health call for every plugin of ``group``; then their next checks."""
        try:
            # Still checked, and not left to its lease, when the call can start.
            live = [
                plugin_id
                for plugin_id in group
                if plugin_id in self._streaks
                and (plugin := self._state.catalog.get(plugin_id)) is not None
                and plugin.status is not PluginStatus.EXPIRED
            ]
            if live:
                ok, error = await self._probe(key, live)
                # One answer for them all: one time, and one pass over the unchanged.
                now = self._state.clock()
                unchanged: list[str] = []
                for plugin_id in live:
                    self._record(plugin_id, ok, error, now, unchanged)
                self._state.touch_many(unchanged, now, error)
        except Exception:
            log.exception("health check of %d plugins at %s failed", len(group), key[0])
        finally:
            if urgent:
                lane.urgent_calls -= 1
            else:
                lane.calls -= 1
            self._release(urgent=urgent)
            self._pump(key)
            settings = self._settings
            # One jitter for the group: plugins that shared this call stay due together
            # (one call again next time), and groups at one address that come due in
            # one slot merge for good, while calls to different addresses stay spread.
            interval = settings.interval * random.uniform(0.9, 1.1)
            for plugin_id in group:
                streak = self._streaks.get(plugin_id)
                if streak is None:
                    continue
                streak.busy = False
                self._schedule(plugin_id, settings.suspect_retry if streak.suspect else interval)

    async def _probe(self, key: _Key, plugin_ids: list[str]) -> tuple[bool, str]:
        try:
            entry = await self._channel(key[0], plugin_ids)
        except _Refused as refused:
            return False, refused.error
        return await self._ask(key, entry)

    async def _ask(self, key: _Key, entry: _Channel) -> tuple[bool, str]:
        """One Health call over ``entry``: (passed, last_error)."""
        address, plugin_type = key
        stub = entry.emitter if plugin_type is PluginType.EMITTER else entry.ingestor
        self.calls += 1
        try:
            response = await self._timed(stub.Health(Empty(), timeout=self._settings.timeout))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the checker is stopping
            # grpc cancels the calls of a channel that is closed: this one's connection
            # broke (or its name went elsewhere) while the call was in flight.
            return False, self._rpc_error(grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNAVAILABLE and entry.target.resolved:
                # The name may point elsewhere now: the next check resolves it again.
                self._drop_channel(address, entry)
            return False, self._rpc_error(code)
        except Exception as exc:  # e.g. an undecodable answer: never the peer's bytes
            log.debug("health check at %s failed: %r", address, exc)
            return False, "not a gRPC plugin, or it failed (its answer could not be read)"
        if not response.healthy:
            return False, _printable(response.message) or "plugin reports unhealthy"
        return True, ""

    async def _timed(self, call: Awaitable[Any]) -> Any:
        """The Health answer of ``call``; its time and result go to ``on_check``."""
        on_check = self._settings.on_check
        if on_check is None:
            return await call
        started = time.perf_counter()
        result = "failed"
        try:
            response = await call
            result = "healthy" if response.healthy else "unhealthy"
            return response
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                result = ""  # the checker is stopping: no result
            raise
        finally:
            if result:
                on_check(time.perf_counter() - started, result)

    def _rpc_error(self, code: grpc.StatusCode) -> str:
        """last_error for a failed Health call: fixed words, never grpc's details."""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            words = f"no answer within {self._settings.timeout:g}s"
        elif code is grpc.StatusCode.UNIMPLEMENTED:
            words = "not a POLKU plugin (Health is not implemented)"
        elif code is grpc.StatusCode.UNAVAILABLE:
            words = "unreachable, or not a gRPC server"
        else:
            words = "not a gRPC plugin, or it failed"
        return f"{code.name}: {words}"

    def _record(
        self,
        plugin_id: str,
        ok: bool,
        error: str,
        now: datetime | None = None,
        unchanged: list[str] | None = None,
    ) -> None:
        """Take a check's result (checked ``now``, default: the clock's now).

        A status change is queued for the next flush; a result that changes no status
        is recorded at once, or, given ``unchanged``, its id is appended there for the
        caller to record in one :meth:`RegistryState.touch_many` with the others.
        """
        plugin = self._state.catalog.get(plugin_id)
        streak = self._streaks.get(plugin_id)
        if plugin is None or streak is None or plugin.status is PluginStatus.EXPIRED:
            return
        self.results += 1
        settings = self._settings
        status = plugin.status
        streak.first = False
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
        if plugin.status is PluginStatus.DRAINING:
            # Held out of routing by an operator: recorded, never moved by a check
            # (the streak still counts, so past the threshold it is no longer a suspect).
            status = PluginStatus.DRAINING
        if now is None:
            now = self._state.clock()
        if status is plugin.status:
            if unchanged is None:
                self._state.touch_many((plugin_id,), now, error)
            else:
                unchanged.append(plugin_id)
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
                # Another change since the check (a drain, an undrain, its lease
                # lapsing) has the last word: the next check starts from it.
                if current is not None and current.revision == wanted.revision:
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

    # -- first checks (of registrations, before they are stored) ------------------

    @contextlib.asynccontextmanager
    async def first_check(
        self, address: str, plugin_type: PluginType, wait: float
    ) -> AsyncIterator[FirstCheck | None]:
        """The first check of a registration at ``address``, to fold into its change.

        Made before the registration is stored, by the checker's own path (the address
        vetted by the policy, the cached channel, a fast-lane slot); the registrations
        of one address and type that come meanwhile share its call. Yields None when
        no answer came within ``wait`` seconds, no fast-lane slot is free, or the
        checker is not running: stored UNKNOWN, the plugin then takes the result of the
        call in flight when it ends, or is checked at once if there is none.

        Store the registration inside the block: a channel opened for a registration
        that is then not stored is closed on leaving it.
        """
        self._holding[address] = self._holding.get(address, 0) + 1
        try:
            yield await self._first_result((address, plugin_type), wait)
        finally:
            held = self._holding.pop(address) - 1
            if held:
                self._holding[address] = held
            self._settle(address)

    async def _first_result(self, key: _Key, wait: float) -> FirstCheck | None:
        if not self._running or wait <= 0:
            return None
        task = self._first.get(key)
        if task is None:
            passed = self._fresh.get(key)
            now = asyncio.get_running_loop().time()
            if passed is not None and now - passed <= FIRST_CHECK_FRESH:
                self.results += 1
                return FirstCheck(PluginStatus.HEALTHY, self._state.clock(), "")
            if not self._urgent_free:
                return None  # the fast lane is full: checked once stored, by its queue
            self._urgent_free -= 1
            task = asyncio.create_task(self._first_call(key), name="health-first-check")
            self._first[key] = task
            task.add_done_callback(functools.partial(self._first_done, key))
        # The call goes on when the wait runs out (or Register is cancelled).
        done, _ = await asyncio.wait((task,), timeout=wait)
        if not done or task.cancelled() or task.exception() is not None:
            return None
        ok, error = task.result()
        self.results += 1
        # As a first check stored UNKNOWN would move it: thresholds (hysteresis) apply.
        if ok:
            status = PluginStatus.HEALTHY
        elif self._settings.unhealthy_threshold <= 1:
            status = PluginStatus.UNHEALTHY
        else:
            status = PluginStatus.UNKNOWN
        return FirstCheck(status, self._state.clock(), error)

    async def _first_call(self, key: _Key) -> tuple[bool, str]:
        address = key[0]
        entry = self._channels.get(address)
        if entry is None:
            try:
                target = await self._vet(address)
            except _Refused as refused:
                return False, refused.error
            entry = self._channels.get(address) or self._open(address, target)
        return await self._ask(key, entry)

    def _remember_pass(self, key: _Key) -> None:
        fresh, now = self._fresh, asyncio.get_running_loop().time()
        fresh.pop(key, None)
        fresh[key] = now
        if len(fresh) > MAX_FRESH:
            # Oldest first (insertion order): drop the stale ones, or the oldest if none is.
            stale = [k for k, at in fresh.items() if now - at > FIRST_CHECK_FRESH]
            for old in stale or [next(iter(fresh))]:
                del fresh[old]

    def _first_done(self, key: _Key, task: asyncio.Task[tuple[bool, str]]) -> None:
        """A first check ended: free its slot, give its result to those stored meanwhile."""
        if self._first.get(key) is task:
            del self._first[key]
        self._release(urgent=True)
        result = None
        if not task.cancelled():
            if task.exception() is None:
                result = task.result()
                if result[0]:
                    self._remember_pass(key)
            else:
                log.error("first health check at %s failed", key[0], exc_info=task.exception())
        entry = self._channels.get(key[0])
        for plugin_id in self._late.pop(key, ()):
            streak = self._streaks.get(plugin_id)
            if streak is None:
                continue
            streak.busy = False
            if result is None:
                self._schedule(plugin_id, 0.0)  # still its first: by the fast lane
                continue
            if entry is not None:
                entry.users.add(plugin_id)
            self._record(plugin_id, *result)
            delay = (
                self._settings.suspect_retry
                if streak.suspect
                else self._settings.interval * random.uniform(0.9, 1.1)
            )
            self._schedule(plugin_id, delay)
        self._settle(key[0])

    def _settle(self, address: str) -> None:
        """Close the channel of ``address`` if first checks opened it for nobody."""
        entry = self._channels.get(address)
        if entry is None or entry.users or address in self._holding:
            return
        if any(key[0] == address for key in self._first):
            return
        self._close_channel(address)

    # -- channels --------------------------------------------------------------

    async def _channel(self, address: str, plugin_ids: list[str]) -> _Channel:
        """The cached channel of ``address``, vetting it first when there is none.

        Raises:
            _Refused: the address does not parse or the address policy refuses it.
        """
        entry = self._channels.get(address)
        if entry is None:
            target = await self._vet(address)
            # Another check of this address may have made one meanwhile.
            entry = self._channels.get(address) or self._open(address, target)
        live = [plugin_id for plugin_id in plugin_ids if plugin_id in self._streaks]
        if not live:  # all forgotten while it was being vetted
            if not entry.users:
                self._close_channel(address)
            raise _Refused("no longer registered")
        entry.users.update(live)
        return entry

    def _open(self, address: str, target: DialTarget) -> _Channel:
        backoff = int(max(1.0, min(self._settings.interval, 5.0)) * 1000)
        channel = self._dialer.open(
            target,
            [
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", backoff),
            ],
        )
        entry = _Channel(
            channel, target, pb_grpc.IngestorPluginStub(channel), pb_grpc.EmitterPluginStub(channel)
        )
        entry.watcher = asyncio.create_task(self._watch_channel(address, entry))
        self._channels[address] = entry
        return entry

    async def _vet(self, address: str) -> DialTarget:
        """Parse and vet ``address``, sharing one attempt among concurrent checks.

        Raises:
            _Refused: with the check's last_error.
        """
        task = self._vetting.get(address)
        if task is None:
            task = asyncio.create_task(self._dialer.vet(address), name="health-vet")
            self._vetting[address] = task
            task.add_done_callback(lambda done: self._vetted(address, done))
        try:
            return await asyncio.shield(task)
        except AddressRefused as exc:
            raise _Refused(f"refused by the address policy ({exc.why})") from exc
        except InvalidArgument as exc:
            log.debug("not checking %s: %s", address, exc)
            raise _Refused("refused by the address policy (not a valid plugin address)") from exc

    def _vetted(self, address: str, task: asyncio.Task[DialTarget]) -> None:
        if self._vetting.get(address) is task:
            del self._vetting[address]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters, if any are left, report it

    async def _watch_channel(self, address: str, entry: _Channel) -> None:
        """When the live connection breaks: drop the channel, re-check its plugins at once.

        The next check makes a new channel, vetting (and resolving) the address again.
        """
        channel = entry.channel
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            new = channel.get_state(try_to_connect=False)
            if (
                state is grpc.ChannelConnectivity.READY
                and new is not grpc.ChannelConnectivity.READY
            ):
                users = list(entry.users)
                self._drop_channel(address, entry, watching=False)
                for plugin_id in users:
                    streak = self._streaks.get(plugin_id)
                    if streak is not None:
                        streak.suspect = True
                        self._schedule(plugin_id, 0.0)
                return
            state = new

    def _close_channel(self, address: str) -> None:
        entry = self._channels.get(address)
        if entry is not None:
            self._drop_channel(address, entry)

    def _drop_channel(self, address: str, entry: _Channel, *, watching: bool = True) -> None:
        """Forget ``entry`` (if still cached) and close it in the background."""
        if self._channels.get(address) is entry:
            del self._channels[address]
        if watching and entry.watcher is not None:
            entry.watcher.cancel()
        if entry.closed:
            return
        entry.closed = True
        task = asyncio.create_task(entry.channel.close())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)


def _printable(message: str) -> str:
    """A plugin's own message, fit for a status line: printable, at most 256 characters."""
    text = "".join(c if c.isprintable() else "?" for c in message[: MAX_PLUGIN_MESSAGE + 1])
    if len(text) > MAX_PLUGIN_MESSAGE:
        text = text[: MAX_PLUGIN_MESSAGE - 1] + "…"
    return text
