"""The lease reaper: expires plugins that stopped heartbeating, removes long-dead ones.

A leased plugin whose last heartbeat is older than its TTL becomes EXPIRED. Plugins
UNHEALTHY or EXPIRED for longer than ``deregister_after`` seconds are removed (0
keeps them). Both clocks count from ``state.grace_from`` at the earliest: the
registry's start, so that after a restart every lease gets one full TTL of grace
and a plugin dead before it is checked again before it can be removed, or the end
of a pause of the registry itself.

A DRAINING plugin (SPEC §9) is neither: an operator holds it out of routing, so its
lease does not lapse and it is never removed while it drains. Undrained, it is
scheduled again from its last heartbeat, like any leased plugin.

Its cost follows the deadlines that come due, not the catalogue's size (SPEC §7):
a plugin has at most one entry per clock in a deadline heap, scheduled when a
committed change shows it leased or dead. A heartbeat schedules nothing (it stays
O(1)): an entry that comes due is checked against the plugin's real deadline and
scheduled again if the lease was renewed meanwhile, so a heartbeating plugin costs
one look per TTL. A removed plugin's entries are forgotten at once and skipped
when they surface. The reaper sleeps until the next deadline (at most ``tick``, at
least a tenth of one, so that deadlines close together make one sweep).

Pauses (SPEC §7 "Pauses do not evict"): a wake much later than planned, by the
monotonic clock (SIGSTOP, a long GC, a starved event loop) or by the wall clock
that leases are judged by (a suspended machine, a clock stepped forward), means no
plugin could heartbeat meanwhile: every lease then gets one TTL of grace from now,
as after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from registry.errors import RegistryUnavailable
from registry.lifecycle import cancel_and_wait
from registry.model import Change, Plugin, PluginStatus
from registry.state import RegistryState

log = logging.getLogger(__name__)

_DEAD = (PluginStatus.UNHEALTHY, PluginStatus.EXPIRED)
# A wake later than this (or than two ticks) is a pause of the registry, not jitter.
PAUSE_THRESHOLD = 1.0
# Wake a hair past a deadline: a lease lapses when its age is over the TTL, not at it.
_PAST = 0.001


class Deadlines:
    """The next deadline of each plugin id, in a heap: pop those that have passed.

    Lazily invalidated: scheduling a later deadline than the one held keeps the
    earlier (its popper re-checks the plugin and schedules again), and
    :meth:`drop` forgets an id at once, leaving its heap entry to be skipped. The
    heap is compacted when skipped entries would outnumber live ones.
    """

    __slots__ = ("_at", "_heap", "popped")

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._at: dict[str, datetime] = {}
        # Heap entries popped so far, skipped ones included: what sweeps cost.
        self.popped = 0

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, plugin_id: object) -> bool:
        return plugin_id in self._at

    def schedule(self, plugin_id: str, deadline: datetime) -> None:
        """Make sure ``plugin_id`` is looked at by ``deadline`` (or earlier)."""
        held = self._at.get(plugin_id)
        if held is not None and held <= deadline:
            return
        self._at[plugin_id] = deadline
        heapq.heappush(self._heap, (deadline, plugin_id))
        self._compact_if_stale()

    def drop(self, plugin_id: str) -> None:
        if self._at.pop(plugin_id, None) is not None:
            self._compact_if_stale()

    def clear(self) -> None:
        self._heap.clear()
        self._at.clear()

    def next(self) -> datetime | None:
        """The earliest deadline held, or None."""
        while self._heap and self._at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale: dropped, or superseded by an earlier deadline
            self.popped += 1
        return self._heap[0][0] if self._heap else None

    def due(self, now: datetime) -> Iterator[str]:
        """Pop and yield each id whose deadline is before ``now``, earliest first."""
        # self._heap each time: scheduling while this runs may compact it into a new list.
        while self._heap and self._heap[0][0] < now:
            deadline, plugin_id = heapq.heappop(self._heap)
            self.popped += 1
            if self._at.get(plugin_id) == deadline:
                del self._at[plugin_id]
                yield plugin_id

    def _compact_if_stale(self) -> None:
        if len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(deadline, plugin_id) for plugin_id, deadline in self._at.items()]
            heapq.heapify(self._heap)


class LeaseReaper:
    """Owned by the server: ``start()``, ``stop()``; ``sweep()`` does what is due now.

    ``monotonic`` is the clock pauses are measured by (tests give a fake one).
    """

    def __init__(
        self,
        state: RegistryState,
        *,
        deregister_after: float,
        tick: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._deregister_after = deregister_after
        self._tick = tick
        self._monotonic = monotonic
        self.pause_threshold = max(PAUSE_THRESHOLD, 2 * tick)
        self._leases = Deadlines()
        self._removals = Deadlines()
        self._task: asyncio.Task[None] | None = None
        # Built and subscribed at once, so no change committed before start() is missed.
        self._rebuild()
        state.subscribe(self._on_changes, on_reset=self._rebuild)

    @property
    def examined(self) -> int:
        """Heap entries the sweeps have popped so far: their whole cost, in entries."""
        return self._leases.popped + self._removals.popped

    @property
    def scheduled(self) -> int:
        """Plugins with a deadline held (at most one per clock each)."""
        return len(self._leases) + len(self._removals)

    def start(self) -> None:
        if self._task is None:
            self._rebuild()  # the state may have loaded its catalog since __init__
            self._task = asyncio.create_task(self._run(), name="lease-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        failed = False
        while True:
            # After a failed sweep its entries are due again at once: wait a tick.
            delay = self._tick if failed else self.next_delay()
            planned = self._monotonic() + delay, self._state.clock() + timedelta(seconds=delay)
            await asyncio.sleep(delay)  # a timer, not synchronisation
            self.check_pause(*planned)
            failed = True
            try:
                await self.sweep()
                failed = False
            except RegistryUnavailable as exc:
                log.warning("lease sweep not stored: %s", exc)
            except Exception:
                log.exception("lease sweep failed")

    def next_delay(self) -> float:
        """Seconds until the next deadline, at most a tick, at least a tenth of one.

        The floor batches deadlines that come due close together (leases renewed at
        random moments) into one sweep; a lease lapses at most that much late.
        """
        deadlines = [d for d in (self._leases.next(), self._removals.next()) if d is not None]
        if not deadlines:
            return self._tick
        until = (min(deadlines) - self._state.clock()).total_seconds() + _PAST
        return min(self._tick, max(until, self._tick / 10))

    def check_pause(self, planned_monotonic: float, planned_wall: datetime) -> float:
        """Grant every lease grace if this wake came over the threshold late.

        Returns how late it came, in seconds, by the later of the two clocks.
        """
        late = max(
            self._monotonic() - planned_monotonic,
            (self._state.clock() - planned_wall).total_seconds(),
        )
        if late > self.pause_threshold:
            self._state.grant_grace()
            log.warning(
                "the registry was paused or starved for %.1fs; every lease gets one TTL "
                "of grace from now",
                late,
            )
        return late

    async def sweep(self) -> None:
        """Expire the leases that lapsed, then remove what has been dead too long.

        Looks only at the deadlines that have passed.

        Raises:
            RegistryUnavailable: the changes could not be stored (they are tried again).
        """
        state = self._state
        now = state.clock()
        expired = []
        # No await from here to the update: the states built are the catalog's latest.
        for plugin_id in self._leases.due(now):
            plugin = state.catalog.get(plugin_id)
            if plugin is None or not self._leased(plugin):
                continue
            deadline = self._lease_deadline(plugin)
            if deadline >= now:
                self._leases.schedule(plugin_id, deadline)  # renewed since it was scheduled
                continue
            ttl = plugin.registration.lease_ttl_seconds
            expired.append(
                dataclasses.replace(
                    plugin,
                    status=PluginStatus.EXPIRED,
                    last_error=f"lease expired: no heartbeat for {ttl}s",
                )
            )
        if expired:
            try:
                await state.update(expired)
            except BaseException:
                for plugin in expired:
                    self._leases.schedule(plugin.plugin_id, now)
                raise
        if not self._deregister_after:
            return
        now = state.clock()
        doomed = []
        for plugin_id in self._removals.due(now):
            plugin = state.catalog.get(plugin_id)
            if plugin is None or plugin.status not in _DEAD:
                continue
            deadline = self._removal_deadline(plugin)
            if deadline >= now:
                self._removals.schedule(plugin_id, deadline)
                continue
            doomed.append(plugin_id)
        if doomed:
            log.info("removing %d plugins dead for over %ss", len(doomed), self._deregister_after)
            try:
                await state.remove(doomed)
            except BaseException:
                for plugin_id in doomed:
                    self._removals.schedule(plugin_id, now)
                raise

    # -- deadlines ---------------------------------------------------------------

    @staticmethod
    def _leased(plugin: Plugin) -> bool:
        """Whether its lease can lapse: leased, live, and not held by a drain."""
        return (
            bool(plugin.registration.lease_ttl_seconds)
            and plugin.live
            and plugin.status is not PluginStatus.DRAINING
        )

    def _lease_deadline(self, plugin: Plugin) -> datetime:
        last = max(plugin.last_heartbeat_at or plugin.registered_at, self._state.grace_from)
        return last + timedelta(seconds=plugin.registration.lease_ttl_seconds)

    def _removal_deadline(self, plugin: Plugin) -> datetime:
        since = max(plugin.status_since or plugin.registered_at, self._state.grace_from)
        return since + timedelta(seconds=self._deregister_after)

    def _track(self, plugin: Plugin) -> None:
        if self._leased(plugin):
            self._leases.schedule(plugin.plugin_id, self._lease_deadline(plugin))
        if self._deregister_after and plugin.status in _DEAD:
            self._removals.schedule(plugin.plugin_id, self._removal_deadline(plugin))

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            for plugin in change.removed:
                self._leases.drop(plugin.plugin_id)
                self._removals.drop(plugin.plugin_id)
            for plugin in change.upserted:
                self._track(plugin)

    def _rebuild(self) -> None:
        """Schedule every plugin of the catalog afresh (at start, after a reload)."""
        self._leases.clear()
        self._removals.clear()
        for plugin in self._state.catalog:
            self._track(plugin)
