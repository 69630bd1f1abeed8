"""CircuitBreaker state machine, on a fake clock."""

from __future__ import annotations

import pytest

from ingestor import BreakerSettings, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, reset: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerSettings(threshold, reset), clock=clock), clock


def test_opens_after_consecutive_failures() -> None:
    breaker, _ = make(threshold=3)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == 10.0


def test_success_resets_the_count() -> None:
    breaker, _ = make(threshold=2)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_through() -> None:
    breaker, clock = make(threshold=1, reset=10)
    breaker.failure()
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # others wait for its outcome
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_failed_probe_reopens() -> None:
    breaker, clock = make(threshold=5, reset=10)
    for _ in range(5):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()
    breaker.failure()  # one failure in half-open is enough
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_released_probe_frees_the_slot() -> None:
    breaker, _clock = make(threshold=1, reset=0)
    breaker.failure()
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout"):
        BreakerSettings(reset_timeout=-1)


def test_half_open_admits_one_probe_among_threads_at_once() -> None:
    import threading

    breaker, clock = make(threshold=1, reset=10)
    breaker.failure()
    clock.now += 10
    start = threading.Barrier(8)
    admitted: list[bool] = []

    def probe() -> None:
        start.wait(timeout=10)
        admitted.append(breaker.allow())

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(admitted) == [False] * 7 + [True]
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
