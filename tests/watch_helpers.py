"""A Watch stream recorder shared by the integration and SDK tests.

:class:`WatchRecorder` reads one ``RegistryClient.watch()`` stream in a task and wakes
its waiters on every message the registry pushes: nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from registry.client import RegistryClient
from registry.wire import pb


class WatchRecorder:
    """One Watch stream read in the background; ``wait`` wakes on every message.

    ``within`` bounds each ``wait`` unless the call gives its own: a bound on a
    failure, never a measure.
    """

    def __init__(self, client: RegistryClient, *, within: float = 30.0) -> None:
        self._client = client
        self._within = within
        self.messages: list[pb.WatchResponse] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WatchRecorder:
        self._task = asyncio.create_task(self._run())
        await self.wait(lambda: bool(self.messages))  # the snapshot: the stream is live
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async for message in self._client.watch():
            async with self._changed:
                self.messages.append(message)
                self._changed.notify_all()

    def history(self, plugin_id: str) -> list[tuple[int, pb.PluginStatus]]:
        """(revision, status) of each change of one plugin, snapshots left out."""
        return [
            (m.revision, p.status)
            for m in self.messages
            if not m.snapshot
            for p in m.upserted
            if p.plugin_id == plugin_id
        ]

    def at(self, revision: int) -> list[pb.WatchResponse]:
        """The change messages (no snapshots) of one revision."""
        return [m for m in self.messages if not m.snapshot and m.revision == revision]

    def removed(self) -> set[str]:
        """Every plugin id any message so far removed."""
        return {i for m in self.messages for i in m.removed_plugin_ids}

    async def wait(self, predicate: Callable[[], bool], *, within: float | None = None) -> None:
        """Return once ``predicate()`` holds; raises AssertionError past the deadline."""
        try:
            async with asyncio.timeout(self._within if within is None else within), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"watch: condition not met; got {self.messages}") from None
