"""TCP sockets seen through Linux ``/proc``: whose they are and what waits unread on them.

Every function here answers empty (or False) where ``/proc`` cannot be read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from .common import until


def _tcp_table() -> list[list[str]]:
    rows: list[list[str]] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                rows += [line.split() for line in table.read().splitlines()[1:]]
        except OSError:
            continue
    return rows


def local_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds (Linux /proc; empty elsewhere)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return {int(f[1].rpartition(":")[2], 16) for f in _tcp_table() if f[9] in inodes}


def queued_connections(port: int) -> dict[str, int]:
    """Established TCP connections to local ``port``: peer -> bytes received, unread.

    From /proc/net/tcp (Linux); empty where it cannot be read. A stopped process's
    listening socket still completes handshakes, so bytes sent to it wait here.
    """
    found: dict[str, int] = {}
    for fields in _tcp_table():
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        if state == "01" and int(local.rpartition(":")[2], 16) == port:
            found[remote] = int(queues.partition(":")[2], 16)
    return found


async def wait_queued(port: int, before: Iterable[str], within: float = 10.0) -> bool:
    """Whether a new connection to ``port`` (not in ``before``) got bytes queued in time.

    Best effort, never fails: without /proc it returns False once ``within`` passed.
    """
    known = set(before)
    try:
        await until(
            lambda: any(q > 0 for peer, q in queued_connections(port).items() if peer not in known),
            within=within,
            interval=0.02,
        )
    except AssertionError:
        return False
    return True
