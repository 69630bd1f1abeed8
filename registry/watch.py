"""The watch hub: fans committed changes out to every Watch stream.

Each watcher has a bounded backlog of changes. A watcher is never cancelled for
being slow: when its backlog overflows, or it asks to resume from a revision the
retained log no longer holds, it is sent a fresh snapshot instead ("replace your
cache"). Memory therefore stays bounded whatever a client does. An idle stream
gets a progress message (the current revision, no changes) every interval. A
revision too large for one message (a big snapshot) comes as several messages of
the same revision; only the first has ``snapshot`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

from registry import convert
from registry.model import Change, Plugin
from registry.state import RegistryState
from registry.wire import pb

log = logging.getLogger(__name__)

MESSAGE_BUDGET = 1024 * 1024  # bytes of plugins per Watch message


class Watcher:
    """One Watch stream's position, filter and pending changes."""

    def __init__(self, sources: frozenset[str], revision: int, max_backlog: int) -> None:
        self.sources = sources
        # Everything up to this revision has been sent (or covered by a snapshot).
        self.revision = revision
        self.backlog: deque[Change] = deque()
        self.max_backlog = max_backlog
        self.needs_snapshot = False
        self.wake = asyncio.Event()

    def matches(self, plugin: Plugin) -> bool:
        return not self.sources or not self.sources.isdisjoint(plugin.registration.sources)

    def push(self, change: Change) -> None:
        if self.needs_snapshot:
            return
        if len(self.backlog) >= self.max_backlog:
            # Too far behind: forget the backlog, send the current state instead.
            self.backlog.clear()
            self.needs_snapshot = True
        else:
            self.backlog.append(change)
        self.wake.set()


def split(
    revision: int,
    upserted: list[pb.RegisteredPlugin],
    removed: list[str],
    *,
    snapshot: bool = False,
) -> list[pb.WatchResponse]:
    """One revision as messages of at most ~MESSAGE_BUDGET bytes each.

    Large snapshots or changes would exceed a client's receive limit (4 MiB by
    default) in one message: they come as several messages of the same revision,
    the first carrying ``snapshot`` and the removals.
    """
    messages = [pb.WatchResponse(revision=revision, snapshot=snapshot, removed_plugin_ids=removed)]
    size = messages[0].ByteSize()
    for plugin in upserted:
        plugin_size = plugin.ByteSize() + 8
        if size + plugin_size > MESSAGE_BUDGET and len(messages[-1].upserted):
            messages.append(pb.WatchResponse(revision=revision))
            size = 0
        messages[-1].upserted.append(plugin)
        size += plugin_size
    return messages


class WatchHub:
    """Owns the retained change log and the watchers. Fed by the state's commits."""

    def __init__(
        self,
        state: RegistryState,
        messages: convert.MessageCache,
        *,
        retain: int = 10_000,
        max_backlog: int = 1024,
        progress_interval: float = 5.0,
    ) -> None:
        self._state = state
        self._messages = messages
        self._log: deque[Change] = deque(maxlen=retain)
        # Resumes wait for the stored log; everything else serves at once.
        self._history_loaded = asyncio.Event()
        self._max_backlog = max_backlog
        self._progress_interval = progress_interval
        self._watchers: set[Watcher] = set()
        self._closed = False
        state.subscribe(self._on_changes, on_reset=self._on_reset)

    async def load_history(self) -> None:
        """Take over the change log stored before this start (in the background: a
        long log must not delay serving). Without it, resumes get snapshots."""
        try:
            stored = await self._state.store.load_history()
        except Exception as exc:
            log.warning("change log not loaded; resuming watchers get snapshots: %s", exc)
            stored = []
        first_live = self._log[0].revision if self._log else None
        older = [c for c in stored if first_live is None or c.revision < first_live]
        self._log = deque([*older, *self._log], maxlen=self._log.maxlen)
        self._history_loaded.set()

    def close(self) -> None:
        """End every stream (they finish with OK); new ones end at once."""
        self._closed = True
        self._history_loaded.set()
        for watcher in self._watchers:
            watcher.wake.set()

    async def stream(
        self, since_revision: int, sources: frozenset[str]
    ) -> AsyncIterator[pb.WatchResponse]:
        """The messages of one Watch call, until the hub closes or the caller stops."""
        if since_revision:
            await self._history_loaded.wait()
        watcher = self._subscribe(since_revision, sources)
        try:
            if not watcher.needs_snapshot and not watcher.backlog:
                # Resumed with nothing missed: say so now, so the client knows the
                # stream is live without waiting for the first progress interval.
                yield pb.WatchResponse(revision=watcher.revision)
            while not self._closed:
                messages = self._next(watcher)
                if messages:
                    for message in messages:
                        yield message
                    continue
                watcher.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), self._progress_interval)
                    continue
                yield pb.WatchResponse(revision=max(watcher.revision, self._state.view.revision))
        finally:
            self._watchers.discard(watcher)

    def _subscribe(self, since: int, sources: frozenset[str]) -> Watcher:
        watcher = Watcher(sources, since, self._max_backlog)
        published = self._state.view.revision
        oldest = self._log[0].revision if self._log else published + 1
        if 0 < since <= published and since >= oldest - 1:
            watcher.backlog.extend(c for c in self._log if c.revision > since)
            if len(watcher.backlog) > self._max_backlog:
                watcher.backlog.clear()
                watcher.needs_snapshot = True
        else:
            watcher.needs_snapshot = True
        self._watchers.add(watcher)
        return watcher

    def _next(self, watcher: Watcher) -> list[pb.WatchResponse]:
        if watcher.needs_snapshot:
            watcher.needs_snapshot = False
            watcher.backlog.clear()
            # The committed view: exactly the state at its revision, nothing a crash
            # could take back; later changes arrive as deltas.
            view = self._state.view
            watcher.revision = view.revision
            plugins = [self._messages.get(p) for p in view if watcher.matches(p)]
            return split(view.revision, plugins, [], snapshot=True)
        while watcher.backlog:
            change = watcher.backlog.popleft()
            if change.revision <= watcher.revision:
                continue
            watcher.revision = change.revision
            upserted = [self._messages.get(p) for p in change.upserted if watcher.matches(p)]
            removed = [p.plugin_id for p in change.removed if watcher.matches(p)]
            if upserted or removed:
                return split(change.revision, upserted, removed)
        return []

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            self._log.append(change)
            for watcher in self._watchers:
                watcher.push(change)

    def _on_reset(self) -> None:
        # The catalog was reloaded after a failed write: every view must be rebuilt.
        self._log.clear()
        for watcher in self._watchers:
            watcher.needs_snapshot = True
            watcher.wake.set()
