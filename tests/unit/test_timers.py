"""SlottedTimers: many deadlines on one loop timer, never early, at most a slot late."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.timers import RESOLUTION, SlottedTimers, slot_of


class FakeLoop:
    """The part of an event loop SlottedTimers uses, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._count = 0
        self.armed = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, (), self)  # type: ignore[arg-type]
        self._count += 1
        heapq.heappush(self._timers, (when, self._count, handle))
        self.armed += 1
        return handle

    def call_soon(self, callback: Any) -> asyncio.TimerHandle:
        return self.call_at(self.now, callback)

    def get_debug(self) -> bool:
        return False

    def _timer_handle_cancelled(self, handle: object) -> None:
        pass

    def pending(self) -> int:
        return sum(1 for _, _, h in self._timers if not h.cancelled())

    def advance(self, to: float) -> None:
        """Run every timer due up to ``to``, in order, moving the clock to each."""
        while self._timers and self._timers[0][0] <= to:
            when, _, handle = heapq.heappop(self._timers)
            if handle.cancelled():
                continue
            self.now = max(self.now, when)
            handle._run()
        self.now = max(self.now, to)


def timers(loop: FakeLoop, fired: list[tuple[float, list[str]]]) -> SlottedTimers[str]:
    return SlottedTimers(lambda keys: fired.append((loop.now, keys)), loop=loop)  # type: ignore[arg-type]


@given(
    when=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    delay=st.floats(min_value=0, max_value=1e5, allow_nan=False),
)
def test_a_slot_is_never_early_and_at_most_its_slack_late(when: float, delay: float) -> None:
    slot = slot_of(when, delay)
    assert slot >= when
    assert slot - when <= min(RESOLUTION, delay / 10) + 1e-6 * max(1.0, when)


def test_keys_due_close_together_come_due_in_one_call() -> None:
    loop, fired = FakeLoop(), []
    wheel = timers(loop, fired)
    for i in range(100):
        wheel.schedule(f"p{i}", 10 + i * 0.0005)  # within 50 ms of each other
    loop.advance(loop.now + 11)
    # One slot, or two where a slot boundary falls between them.
    assert len(fired) <= 2
    assert sorted(k for _, keys in fired for k in keys) == sorted(f"p{i}" for i in range(100))
    assert len(wheel) == 0


def test_one_loop_timer_for_many_keys_and_none_when_nothing_is_due() -> None:
    loop, fired = FakeLoop(), []
    wheel = timers(loop, fired)
    for i in range(1000):
        wheel.schedule(f"p{i}", 5 + i * 0.01)
    assert loop.pending() == 1
    for i in range(1000):
        wheel.cancel(f"p{i}")
    assert loop.pending() == 0
    assert not wheel.armed


def test_an_earlier_deadline_rearms_and_a_rescheduled_key_comes_due_once() -> None:
    loop, fired = FakeLoop(), []
    wheel = timers(loop, fired)
    start = loop.now
    wheel.schedule("late", 10)
    wheel.schedule("soon", 1)
    wheel.schedule("late", 2)  # replaces its deadline of 10 s
    loop.advance(start + 20)
    assert [keys for _, keys in fired] == [["soon"], ["late"]]
    assert fired[0][0] >= start + 1
    assert fired[1][0] >= start + 2


def test_zero_delay_comes_due_now_and_a_due_key_may_be_scheduled_again() -> None:
    loop, fired = FakeLoop(), []
    again: list[str] = []

    def on_due(keys: list[str]) -> None:
        fired.append((loop.now, keys))
        if not again:
            again.append("x")
            wheel.schedule("x", 0.5)

    wheel: SlottedTimers[str] = SlottedTimers(on_due, loop=loop)  # type: ignore[arg-type]
    start = loop.now
    wheel.schedule("x", 0)
    loop.advance(start)
    assert fired == [(start, ["x"])]
    loop.advance(start + 1)
    assert [keys for _, keys in fired] == [["x"], ["x"]]
    assert start + 0.5 <= fired[1][0] <= start + 0.55


ops = st.lists(
    st.tuples(
        st.sampled_from(["schedule", "cancel", "advance"]),
        st.integers(min_value=0, max_value=7),
        st.floats(min_value=0, max_value=30, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_every_key_comes_due_once_per_deadline_never_early_at_most_a_slot_late(
    steps: list[tuple[str, int, float]],
) -> None:
    loop, fired = FakeLoop(), []
    wheel = timers(loop, fired)
    wanted: dict[str, tuple[float, float]] = {}  # key -> (deadline, latest allowed)
    for op, number, amount in steps:
        key = f"k{number}"
        if op == "schedule":
            wheel.schedule(key, amount)
            slack = min(RESOLUTION, amount / 10) + 1e-6
            wanted[key] = (loop.now + amount, loop.now + amount + slack)
        elif op == "cancel":
            wheel.cancel(key)
            wanted.pop(key, None)
        else:
            fired.clear()
            loop.advance(loop.now + amount)
            came = [(at, k) for at, keys in fired for k in keys]
            assert len({k for _, k in came}) == len(came)  # once each
            for at, k in came:
                deadline, latest = wanted.pop(k)
                assert deadline - 1e-6 <= at <= latest
            # Whatever is still wanted is not due yet, and it is held.
            for k, (_, latest) in wanted.items():
                assert latest > loop.now - 1e-6 or k in wheel
            assert set(wanted) == set(wheel)
    assert (loop.pending() > 0) == bool(len(wheel))


async def test_on_a_real_loop_checks_due_together_come_together() -> None:
    fired: list[list[str]] = []
    done = asyncio.Event()

    def on_due(keys: list[str]) -> None:
        fired.append(keys)
        if sum(map(len, fired)) == 50:
            done.set()

    wheel: SlottedTimers[str] = SlottedTimers(on_due)
    for i in range(50):
        wheel.schedule(f"p{i}", 0.05)
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(k for keys in fired for k in keys) == sorted(f"p{i}" for i in range(50))
    assert len(fired) <= 2
    wheel.clear()
