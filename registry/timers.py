"""Deadlines of many keys on one event-loop timer, coalesced into slots.

The health checker schedules every plugin's next check: 10,000 plugins at a 10 s
interval are 1,000 deadlines a second. One ``loop.call_later`` per deadline is
10,000 ``TimerHandle`` objects in the loop's heap and a wake-up per check, each
making its own Health call. :class:`SlottedTimers` holds the deadlines itself and
keeps one loop timer, for its earliest slot.

A deadline is never early and at most ``slack`` late: it is rounded up to a grid
whose step is the smaller of ``resolution`` and a tenth of the delay (a 10 s check
by at most 0.1 s, a 0.1 s retry by at most 0.01 s). Keys that fall in one slot come
due together, in one call of ``on_due``, so checks due close together go out as
one Health call per address. A delay of 0 comes due at the loop's next iteration
(``call_soon``), with the others due now.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

RESOLUTION = 0.1  # seconds: the most a deadline is put off to share a slot
MIN_STEP = 0.001  # seconds: finer slots are not worth their rounding


def slot_of(when: float, delay: float, resolution: float = RESOLUTION) -> float:
    """The slot a deadline ``delay`` seconds ahead, at ``when``, comes due in: never
    before ``when``, at most ``min(resolution, delay / 10)`` after it."""
    step = min(resolution, delay / 10)
    if step < MIN_STEP:
        return when  # a delay this short is kept as it is
    slot = math.ceil(when / step) * step
    return slot if slot >= when else when  # float rounding: never early


class SlottedTimers(Generic[K]):
    """One loop timer for any number of keys, each with at most one deadline.

    ``on_due(keys)`` is called from the event loop with every key whose slot has
    come, earliest slot first; a key is forgotten before it is handed over, so
    ``on_due`` may schedule it again. Times are the running loop's ``time()``; with
    no deadline left it holds no loop timer (nothing wakes the loop).
    """

    __slots__ = (
        "_clock",
        "_given",
        "_handle",
        "_heap",
        "_loop",
        "_on_due",
        "_resolution",
        "_slots",
        "_when",
    )

    def __init__(
        self,
        on_due: Callable[[list[K]], None],
        *,
        resolution: float = RESOLUTION,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._on_due = on_due
        self._resolution = resolution
        self._given = loop
        self._loop = loop  # None: the running loop, from the first schedule on
        self._slots: dict[float, dict[K, None]] = {}
        self._heap: list[float] = []  # slot times, each once, possibly emptied since
        self._when: dict[K, float] = {}
        self._handle: asyncio.Handle | None = None
        self._clock: float | None = None  # the slot the loop timer is armed for

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def __iter__(self) -> Iterator[K]:
        return iter(self._when)

    @property
    def armed(self) -> bool:
        """Whether a loop timer (or a call at the next iteration) is pending."""
        return self._handle is not None

    def deadline(self, key: K) -> float | None:
        """The loop time ``key`` comes due at, or None."""
        return self._when.get(key)

    def schedule(self, key: K, delay: float) -> None:
        """(Re)schedule ``key`` ``delay`` seconds from now, replacing its deadline."""
        loop = self._running_loop()
        now = loop.time()
        delay = max(delay, 0.0)
        slot = now if delay == 0 else slot_of(now + delay, delay, self._resolution)
        self.cancel(key)
        keys = self._slots.get(slot)
        if keys is None:
            keys = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        keys[key] = None
        self._when[key] = slot
        if self._clock is None or slot < self._clock:
            self._arm(loop, slot, now)

    def cancel(self, key: K) -> None:
        """Forget ``key``'s deadline, if it has one. Its slot's loop timer stays (it
        fires, finds nothing, and arms the next)."""
        slot = self._when.pop(key, None)
        if slot is None:
            return
        keys = self._slots[slot]
        del keys[key]
        if not keys:
            del self._slots[slot]
        if not self._when:
            self.clear()

    def clear(self) -> None:
        """Forget every deadline and the loop timer."""
        self._slots.clear()
        self._heap.clear()
        self._when.clear()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._clock = None
        self._loop = self._given

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: float, now: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._clock = slot
        if slot <= now:
            self._handle = loop.call_soon(self._fire)
        else:
            self._handle = loop.call_at(slot, self._fire)

    def _fire(self) -> None:
        self._handle = self._clock = None
        loop = self._running_loop()
        now = loop.time()
        due: list[K] = []
        heap = self._heap
        while heap and heap[0] <= now:
            keys = self._slots.pop(heapq.heappop(heap), None)
            if keys:
                for key in keys:
                    del self._when[key]
                due.extend(keys)
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)  # emptied by cancels
        if heap:
            self._arm(loop, heap[0], now)
        if due:
            self._on_due(due)
