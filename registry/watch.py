"""The watch hub: fans committed changes out to every Watch stream.

Each watcher has a bounded backlog of changes. A watcher is never cancelled for
being slow: when its backlog overflows, or it asks to resume from a revision the
retained log no longer holds, it is sent a fresh snapshot instead ("replace your
cache"). An idle stream gets a progress message (the current revision, no changes)
every interval. A revision too large for one message (a big snapshot) comes as
several messages of the same revision; only the first has ``snapshot`` set.

Memory does not depend on slow readers (SPEC §7). A snapshot is the view's plugins
at its revision, taken once as a tuple of references to the catalog's immutable
``Plugin`` objects and shared by every watcher that snapshots at that revision.
A revision's messages are built lazily, one of ~MESSAGE_BUDGET bytes each time the
stream has handed the previous one to gRPC, from the message cache's shared encoded
bytes: a stream whose reader stopped holds the one message it is blocked on, never
a copy of the catalogue (and, while it is behind, references to the plugin states
of the revision it is sending, which every stream at that revision shares). A
revision once started is always sent to its end, so a client never sees half of one
revision followed by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator

from registry import convert
from registry.labels import EVERYTHING, Selector
from registry.model import Change, Plugin
from registry.state import RegistryState
from registry.wire import pb

log = logging.getLogger(__name__)

MESSAGE_BUDGET = 1024 * 1024  # bytes of plugins per Watch message


class ViewSnapshot:
    """The view's plugins at one revision, shared by the watchers snapshotting at it.

    Holds references only: the plugins are the catalog's own immutable objects.
    """

    __slots__ = ("__weakref__", "plugins", "revision")

    def __init__(self, revision: int, plugins: tuple[Plugin, ...]) -> None:
        self.revision = revision
        self.plugins = plugins


class Watcher:
    """One Watch stream's position, filters and pending changes.

    A plugin concerns the watcher when it declares one of ``sources`` (any, when
    empty) and its labels match ``selector``. Both are fixed for a plugin id: a new
    source or label comes with a re-registration, a new id replacing the old in one
    change, so a plugin that stops matching is sent as removed (its old id), and one
    that starts matching as upserted.
    """

    def __init__(
        self,
        sources: frozenset[str],
        revision: int,
        max_backlog: int,
        selector: Selector = EVERYTHING,
    ) -> None:
        self.sources = sources
        self.selector = selector
        # Everything up to this revision has been sent (or covered by a snapshot).
        self.revision = revision
        self.backlog: deque[Change] = deque()
        self.max_backlog = max_backlog
        self.needs_snapshot = False
        # The rest of the revision being sent, built one message at a time.
        self.sending: Iterator[pb.WatchResponse] | None = None
        self.wake = asyncio.Event()

    def matches(self, plugin: Plugin) -> bool:
        registration = plugin.registration
        if self.sources and self.sources.isdisjoint(registration.sources):
            return False
        return not self.selector or self.selector.matches(registration.labels)

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
        # The snapshot at the view's revision while any watcher still sends it.
        self._snapshot: weakref.ref[ViewSnapshot] | None = None
        self._closed = False
        # Messages handed to Watch streams so far (metrics read it).
        self.messages_sent = 0
        state.subscribe(self._on_changes, on_reset=self._on_reset)

    async def load_history(self) -> None:
        """Take over the change log stored before this start (in the background: a
        long log must not delay serving). Without it, resumes get snapshots."""
        try:
            stored = await self._state.store.load_history()
        except Exception as exc:
            log.warning("change log not loaded; resuming watchers get snapshots: %s", exc)
            stored = []
        # Only what the view already holds: a replica's pump may not have applied the
        # newest stored revisions yet, and will hand them over itself.
        first_live = self._log[0].revision if self._log else self._state.view.revision + 1
        older = [c for c in stored if c.revision < first_live]
        self._log = deque([*older, *self._log], maxlen=self._log.maxlen)
        self._history_loaded.set()

    @property
    def watchers(self) -> int:
        """Watch streams open now."""
        return len(self._watchers)

    def close(self) -> None:
        """End every stream (they finish with OK); new ones end at once."""
        self._closed = True
        self._history_loaded.set()
        for watcher in self._watchers:
            watcher.wake.set()

    async def stream(
        self, since_revision: int, sources: frozenset[str], selector: Selector = EVERYTHING
    ) -> AsyncIterator[pb.WatchResponse]:
        """The messages of one Watch call, until the hub closes or the caller stops.

        Only plugins that declare one of ``sources`` (any, when empty) and match
        ``selector`` are sent (see :class:`Watcher`).
        """
        if since_revision:
            await self._history_loaded.wait()
        watcher = self._subscribe(since_revision, sources, selector)
        try:
            if not watcher.needs_snapshot and not watcher.backlog:
                # Resumed with nothing missed: say so now, so the client knows the
                # stream is live without waiting for the first progress interval.
                self.messages_sent += 1
                yield pb.WatchResponse(revision=watcher.revision)
            while not self._closed:
                message = self._next(watcher)
                if message is not None:
                    self.messages_sent += 1
                    yield message
                    # Dropped now, not once the next one is built: one at a time.
                    message = None
                    continue
                watcher.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), self._progress_interval)
                    continue
                self.messages_sent += 1
                yield pb.WatchResponse(revision=max(watcher.revision, self._state.view.revision))
        finally:
            watcher.sending = None
            self._watchers.discard(watcher)

    def _subscribe(self, since: int, sources: frozenset[str], selector: Selector) -> Watcher:
        watcher = Watcher(sources, since, self._max_backlog, selector)
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

    def _next(self, watcher: Watcher) -> pb.WatchResponse | None:
        """The watcher's next message, built now; None when it has nothing to send."""
        while True:
            if watcher.sending is not None:
                message = next(watcher.sending, None)
                if message is not None:
                    return message
                watcher.sending = None
            if watcher.needs_snapshot:
                watcher.needs_snapshot = False
                watcher.backlog.clear()
                # The committed view: exactly the state at its revision, nothing a crash
                # could take back; later changes arrive as deltas.
                snapshot = self._current_snapshot()
                watcher.revision = snapshot.revision
                matching = (p for p in snapshot.plugins if watcher.matches(p))
                watcher.sending = self._messages_of(snapshot.revision, matching, [], snapshot=True)
                continue
            while watcher.backlog:
                change = watcher.backlog.popleft()
                if change.revision <= watcher.revision:
                    continue
                watcher.revision = change.revision
                upserted = [p for p in change.upserted if watcher.matches(p)]
                removed = [p.plugin_id for p in change.removed if watcher.matches(p)]
                if upserted or removed:
                    watcher.sending = self._messages_of(change.revision, upserted, removed)
                    break
            if watcher.sending is None:
                return None

    def _current_snapshot(self) -> ViewSnapshot:
        """The view's plugins now: shared while some watcher still sends them."""
        snapshot = self._snapshot() if self._snapshot is not None else None
        view = self._state.view
        if snapshot is None or snapshot.revision != view.revision:
            snapshot = ViewSnapshot(view.revision, tuple(view))
            self._snapshot = weakref.ref(snapshot)
        return snapshot

    def _messages_of(
        self,
        revision: int,
        plugins: Iterable[Plugin],
        removed: list[str],
        *,
        snapshot: bool = False,
    ) -> Iterator[pb.WatchResponse]:
        """One revision as messages of at most ~MESSAGE_BUDGET bytes, built lazily.

        Large snapshots or changes would exceed a client's receive limit (4 MiB by
        default) in one message: they come as several messages of the same revision,
        the first carrying ``snapshot`` and the removals. Each message is built only
        when the previous one was taken; in between, this holds the encoded items of
        the next one at most (the cache's shared bytes).
        """
        items: list[bytes] = []
        size = sum(len(plugin_id) + 2 for plugin_id in removed)
        first = True
        for plugin in plugins:
            item = self._encoded(plugin, exact=not snapshot)
            if items and size + len(item) > MESSAGE_BUDGET:
                batch, items, size = items, [], 0
                yield convert.watch_response(
                    revision, batch, removed if first else [], snapshot=snapshot and first
                )
                first = False
            items.append(item)
            size += len(item)
        if items or first:
            yield convert.watch_response(
                revision, items, removed if first else [], snapshot=snapshot and first
            )

    def _encoded(self, plugin: Plugin, *, exact: bool) -> bytes:
        """A plugin state as the message cache's shared bytes where it can be.

        ``exact``: this very state (a change's, which resumes must see alike);
        otherwise the view's object of the same revision may stand in for it (a
        snapshot, whose times were touched since). States the view has left behind
        (a lagging watcher's, a removed plugin's) are built for the caller alone:
        they must neither evict newer entries nor bring removed plugins back.
        """
        current = self._state.view.get(plugin.plugin_id)
        if current is None or current.revision != plugin.revision:
            return self._messages.encoded(plugin, keep=False)
        return self._messages.encoded(plugin if exact else current)

    def _on_changes(self, changes: list[Change]) -> None:
        self._snapshot = None  # the next snapshot is at the new revision
        for change in changes:
            self._log.append(change)
            for watcher in self._watchers:
                watcher.push(change)

    def _on_reset(self) -> None:
        # The catalog was reloaded after a failed write: every view must be rebuilt.
        self._snapshot = None
        self._log.clear()
        for watcher in self._watchers:
            watcher.needs_snapshot = True
            watcher.wake.set()
