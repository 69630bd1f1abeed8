"""The watch hub: fans committed changes out to every Watch stream.

Each watcher has a bounded backlog of changes. A watcher is never cancelled for
being slow: when its backlog overflows, or it asks to resume from a revision the
retained log no longer holds, it is sent a fresh snapshot instead ("replace your
cache"). Memory therefore stays bounded whatever a client does. An idle stream
gets a progress message (the current revision, no changes) every interval.
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


class Watcher:
    """One Watch stream's position, filter and pending changes."""

    def __init__(self, sources: frozenset[str], revision: int, max_backlog: int) -> None:
        self.sources = sources
        # Everything up to this revision has been sent (or covered by a snapshot).
        self.revision = revision
        self.backlog: deque[Change] = deque()
        self.max_backlog = max_backlog
        self.needs_snapshot = False
        # Ids this stream has been told of; None after a resume (then removals pass unfiltered).
        self.known: set[str] | None = None
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

    def delta(self, change: Change, messages: convert.MessageCache) -> pb.WatchResponse | None:
        """The message for one change, filtered; None when nothing in it concerns us."""
        if change.revision <= self.revision:
            return None
        self.revision = change.revision
        upserted = [p for p in change.upserted if self.matches(p)]
        removed = [i for i in change.removed if self.known is None or i in self.known]
        if self.known is not None:
            self.known.difference_update(removed)
            self.known.update(p.plugin_id for p in upserted)
        if not upserted and not removed:
            return None
        return pb.WatchResponse(
            revision=change.revision,
            upserted=[messages.get(p) for p in upserted],
            removed_plugin_ids=removed,
        )


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
        self._log: deque[Change] = deque(state.history, maxlen=retain)
        self._published = state.catalog.revision
        self._max_backlog = max_backlog
        self._progress_interval = progress_interval
        self._watchers: set[Watcher] = set()
        self._closed = False
        state.subscribe(self._on_changes, on_reset=self._on_reset)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def close(self) -> None:
        """End every stream (they finish with OK); new ones end at once."""
        self._closed = True
        for watcher in self._watchers:
            watcher.wake.set()

    async def stream(
        self, since_revision: int, sources: frozenset[str]
    ) -> AsyncIterator[pb.WatchResponse]:
        """The messages of one Watch call, until the hub closes or the caller stops."""
        watcher = self._subscribe(since_revision, sources)
        try:
            if not watcher.needs_snapshot and not watcher.backlog:
                # Resumed with nothing missed: say so now, so the client knows the
                # stream is live without waiting for the first progress interval.
                yield pb.WatchResponse(revision=watcher.revision)
            while not self._closed:
                message = self._next(watcher)
                if message is not None:
                    yield message
                    continue
                watcher.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), self._progress_interval)
                    continue
                yield pb.WatchResponse(revision=max(watcher.revision, self._published))
        finally:
            self._watchers.discard(watcher)

    def _subscribe(self, since: int, sources: frozenset[str]) -> Watcher:
        watcher = Watcher(sources, since, self._max_backlog)
        oldest = self._log[0].revision if self._log else self._published + 1
        if 0 < since <= self._published and since >= oldest - 1:
            watcher.backlog.extend(c for c in self._log if c.revision > since)
            if len(watcher.backlog) > self._max_backlog:
                watcher.backlog.clear()
                watcher.needs_snapshot = True
        else:
            watcher.needs_snapshot = True
        self._watchers.add(watcher)
        return watcher

    def _next(self, watcher: Watcher) -> pb.WatchResponse | None:
        if watcher.needs_snapshot:
            watcher.needs_snapshot = False
            watcher.backlog.clear()
            return self._snapshot(watcher)
        while watcher.backlog:
            message = watcher.delta(watcher.backlog.popleft(), self._messages)
            if message is not None:
                return message
        return None

    def _snapshot(self, watcher: Watcher) -> pb.WatchResponse:
        catalog = self._state.catalog
        plugins = [p for p in catalog if watcher.matches(p)]
        # The catalog may hold changes still being committed: they are in this
        # snapshot, and skipped when they are published (revision <= watcher's).
        watcher.revision = catalog.revision
        watcher.known = {p.plugin_id for p in plugins}
        return pb.WatchResponse(
            revision=catalog.revision,
            snapshot=True,
            upserted=[self._messages.get(p) for p in plugins],
        )

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            self._log.append(change)
            self._published = change.revision
            for watcher in self._watchers:
                watcher.push(change)

    def _on_reset(self) -> None:
        # The catalog was reloaded after a failed write: every view must be rebuilt.
        self._log.clear()
        self._published = self._state.catalog.revision
        for watcher in self._watchers:
            watcher.needs_snapshot = True
            watcher.wake.set()
