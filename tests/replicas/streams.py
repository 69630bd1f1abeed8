"""Watch streams recorded in full, and checked against the ``changes`` table.

:class:`WatchStream` keeps every message of one stream; :func:`history_of` reads them as
revisions and :func:`divergence` says how they differ from the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from registry.client import RegistryClient
from registry.wire import pb

from .common import DEADLINE, rpc_error, short, until

if TYPE_CHECKING:
    from .cluster import Change, Cluster


@dataclass
class History:
    """What one Watch stream said, as revisions.

    ``base`` is the first snapshot's revision, ``revisions`` those of the change messages
    after it (no progress messages, no rest of a split snapshot), ``resets`` those of
    any later snapshot, ``expired`` every ``(revision, plugin_id)`` sent as EXPIRED.
    """

    address: str
    base: int
    revisions: list[int]
    resets: list[int] = field(default_factory=list)
    expired: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def history_of(address: str, messages: Sequence[pb.WatchResponse]) -> History:
    """Read a recorded stream (see :class:`History`)."""
    if not messages:
        return History(address, 0, [], problems=["it sent no message at all"])
    first = messages[0]
    history = History(address, first.revision if first.snapshot else 0, [])
    if not first.snapshot:
        history.problems.append(f"its first message (revision {first.revision}) is no snapshot")
    snapshot_revision = history.base if first.snapshot else -1
    for message in messages:
        history.expired += [
            (message.revision, p.plugin_id)
            for p in message.upserted
            if p.status == pb.PLUGIN_STATUS_EXPIRED
        ]
    for message in messages[1:] if first.snapshot else messages:
        if message.snapshot:
            history.resets.append(message.revision)
            snapshot_revision = message.revision
        elif not message.upserted and not message.removed_plugin_ids:
            continue  # a progress message
        elif message.revision == snapshot_revision:
            continue  # the rest of a snapshot split over several messages
        else:
            history.revisions.append(message.revision)
    return history


def divergence(history: History, table: Sequence[int], upto: int) -> str:
    """How a stream's changes differ from the ``changes`` table; ``""`` when they do not.

    Only revisions in ``(history.base, upto]`` count: before is the snapshot's, after
    is not settled yet. ``table`` is the table's revisions that name a plugin.
    """
    expected = [r for r in table if history.base < r <= upto]
    got = [r for r in history.revisions if r <= upto]
    issues = list(history.problems)
    if history.resets:
        issues.append(
            f"fresh snapshots mid-stream at revisions {short(history.resets)} "
            "(a resync reached the watchers instead of the changes)"
        )
    backwards = [(a, b) for a, b in itertools.pairwise(got) if b <= a]
    if backwards:
        issues.append(f"not strictly increasing at {short(backwards, 5)}")
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        issues.append(
            f"{len(got)} change messages after its snapshot at {history.base} (up to {upto}) "
            f"but the changes table has {len(expected)}; they part at position {first} "
            f"(stream {short(got[first : first + 5], 5)}, table "
            f"{short(expected[first : first + 5], 5)}); missing {short(missing)}; "
            f"not in the table {short(extra)}"
        )
    return f"Watch on {history.address}: " + "; ".join(issues) if issues else ""


class WatchStream:
    """A Watch from revision 0 on one replica, read in the background; keeps every message."""

    def __init__(self, client: RegistryClient, address: str) -> None:
        self.client = client
        self.address = address
        self.messages: list[pb.WatchResponse] = []
        self.error = ""
        self.ended = False
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, within: float = DEADLINE) -> None:
        """Start reading and wait for the first message.

        Raises:
            AssertionError: the stream ended or stayed silent first.
        """
        self._task = asyncio.create_task(self._read(), name=f"watch {self.address}")
        await until(
            lambda: self.messages or self.ended,
            within=within,
            what=f"the first Watch message from {self.address}",
            interval=0.01,
        )
        if not self.messages:
            raise AssertionError(f"Watch on {self.address} ended before a snapshot: {self.error}")

    async def _read(self) -> None:
        self._call = self.client.stub.Watch(pb.WatchRequest(since_revision=0))
        try:
            async for message in self._call:
                self.messages.append(message)
        except grpc.aio.AioRpcError as exc:
            self.error = rpc_error(exc)
        finally:
            self.ended = True

    @property
    def seen(self) -> int:
        """The highest revision any message carried (progress messages too)."""
        return max((m.revision for m in self.messages), default=0)

    def history(self) -> History:
        return history_of(self.address, list(self.messages))

    async def wait_seen(self, revision: int, within: float = DEADLINE) -> None:
        """Wait until a message at ``revision`` or later came.

        Raises:
            AssertionError: the stream ended or ``within`` passed first.
        """
        await until(
            lambda: self.seen >= revision or self.ended,
            within=within,
            what=lambda: f"Watch on {self.address} to reach {revision} (at {self.seen})",
            interval=0.02,
        )
        if self.seen < revision:
            raise AssertionError(
                f"Watch on {self.address} ended at revision {self.seen} before {revision}: "
                f"{self.error or 'closed by the server'}"
            )

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def check_streams(
    cluster: Cluster, streams: Sequence[WatchStream], head: int, *, within: float = DEADLINE
) -> list[Change]:
    """Wait until each stream reached ``head``; assert it matches the ``changes`` table.

    Returns the table. Raises AssertionError naming every stream that diverged.
    """
    for stream in streams:
        await stream.wait_seen(head, within=within)
    table = await cluster.changes()
    carrying = [c.revision for c in table if c.carries_plugins]
    problems = [p for s in streams if (p := divergence(s.history(), carrying, head))]
    silent = [c.revision for c in table if not c.carries_plugins]
    note = f" (rows naming no plugin, left out: {short(silent)})" if silent else ""
    assert not problems, "\n".join(problems) + note
    return table
