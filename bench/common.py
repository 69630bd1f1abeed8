"""Shared measurement helpers for the benchmarks: load loops, percentiles, subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Load:
    """What one closed-loop run measured."""

    calls: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def closed_loop(
    call: Callable[[int], Awaitable[object]], *, concurrency: int, seconds: float
) -> Load:
    """Run ``call(i)`` from ``concurrency`` workers for about ``seconds``."""
    latencies: list[float] = []
    counter = iter(range(10**12))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(next(counter))
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(len(latencies), time.perf_counter() - began, latencies)


def row(
    scenario: str, ours: float, baseline: float, target: str, unit: str = "calls/s", **extra: object
) -> dict[str, object]:
    ratio = ours / baseline if baseline else 0.0
    return {
        "scenario": scenario,
        "ours": round(ours, 1),
        "baseline": round(baseline, 1),
        "ratio": round(ratio, 3),
        "target": target,
        "unit": unit,
        **extra,
    }


class Process:
    """A subprocess whose output is drained in the background; finds its ready line.

    The registry says ``serving on HOST:PORT`` on stderr; a ``registry.testing``
    plugin says ``listening on HOST:PORT`` on stdout (``stdout=True``).
    """

    def __init__(
        self, args: list[str], pattern: str = r"serving on (\S+)", *, stdout: bool = False
    ) -> None:
        self.started = time.perf_counter()
        pipe, quiet = subprocess.PIPE, subprocess.DEVNULL
        self.proc = subprocess.Popen(
            args, stdout=pipe if stdout else quiet, stderr=quiet if stdout else pipe, text=True
        )
        self._stream = self.proc.stdout if stdout else self.proc.stderr
        self._pattern = re.compile(pattern)
        self._found = threading.Event()
        self.address = ""
        self.ready_at = 0.0
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self._stream is not None
        for line in self._stream:
            match = self._pattern.search(line)
            if match and not self._found.is_set():
                self.address = match.group(1)
                self.ready_at = time.perf_counter()
                self._found.set()
        self._stream.close()  # at EOF: the process has closed its end

    def wait_ready(self, timeout: float = 60.0) -> str:
        if not self._found.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.proc.args!r} did not start")
        return self.address

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def python() -> str:
    return sys.executable


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: count fields after its ')'.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def cpu_quiet(
    pid: int, *, window: float = 0.2, busy: float = 0.01, within: float = 10.0
) -> bool:
    """Wait until a process uses at most ``busy`` s of CPU over ``window`` s (its
    background work after a load is done); False if it is still busy after ``within`` s."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(window)  # the observation window itself
        if cpu_seconds(pid) - before <= busy:
            return True
    return False
