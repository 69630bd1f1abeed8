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

A message is encoded once and the same ``bytes`` object goes to every watcher whose
filters give it the same content: the hub yields encoded WatchResponses, which the
Watch method's response serializer hands to gRPC as they are (registry.server). The
shared messages are the current revision's (a change, a progress message, a snapshot
of one message while a stream sends it), bounded, and dropped when the revision moves
on. A watcher far behind (its backlog holds more than ``coalesce_after`` changes when
it is ready to send, a resume's missed changes included) gets them as one message at
the newest revision: the latest state of each plugin that changed, and the removals;
the backlog bound and its snapshot are unchanged. Below that it gets one message per
change (SPEC §1.2), so watchers that keep up see the same revisions on every replica
(SPEC §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Sequence
from functools import partial

from registry import convert, heap
from registry.labels import EVERYTHING, Selector
from registry.model import Change, Plugin
from registry.state import RegistryState

log = logging.getLogger(__name__)

MESSAGE_BUDGET = 1024 * 1024  # bytes of plugins per Watch message
# Encoded messages of the current revision shared by the watchers that get them.
SHARED_MESSAGES = 1024
SHARED_BYTES = 16 * 1024 * 1024
_PROGRESS = ("progress",)  # the key of the current revision's progress message


class ViewSnapshot:
    """The view's plugins at one revision, shared by the watchers snapshotting at it.

    Holds references only: the plugins are the catalog's own immutable objects, and
    ``messages`` the encoded snapshots of one message each, by filter, while some
    stream sends this snapshot (at most SHARED_BYTES of them).
    """

    __slots__ = ("__weakref__", "messages", "plugins", "revision", "size")

    def __init__(self, revision: int, plugins: tuple[Plugin, ...]) -> None:
        self.revision = revision
        self.plugins = plugins
        self.messages: dict[Hashable, bytes] = {}
        self.size = 0

    def share(self, key: Hashable, message: bytes) -> None:
        if self.size + len(message) <= SHARED_BYTES and len(self.messages) < SHARED_MESSAGES:
            self.messages[key] = message
            self.size += len(message)


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
        # Every plugin concerns it: no filter to match.
        self.everything = not sources and not selector
        # Everything up to this revision has been sent (or covered by a snapshot).
        self.revision = revision
        self.backlog: deque[Change] = deque()
        self.max_backlog = max_backlog
        self.needs_snapshot = False
        # The rest of the revision being sent, built one message at a time (encoded).
        self.sending: Iterator[bytes] | None = None
        self.wake = asyncio.Event()

    @property
    def filters(self) -> Hashable:
        """What decides which plugins concern it: equal for watchers alike."""
        return (self.sources, self.selector)

    def matches(self, plugin: Plugin) -> bool:
        if self.everything:
            return True
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
        coalesce_after: int | None = None,
    ) -> None:
        """``coalesce_after``: backlog length past which a watcher's changes come as one
        message (default: an eighth of ``max_backlog``, at least 1)."""
        self._state = state
        self._messages = messages
        self._log: deque[Change] = deque(maxlen=retain)
        # Resumes wait for the stored log; everything else serves at once.
        self._history_loaded = asyncio.Event()
        self._max_backlog = max_backlog
        if coalesce_after is None:
            coalesce_after = max(1, max_backlog // 8)
        self._coalesce_after = coalesce_after
        self._progress_interval = progress_interval
        self._watchers: set[Watcher] = set()
        # The snapshot at the view's revision while any watcher still sends it.
        self._snapshot: weakref.ref[ViewSnapshot] | None = None
        self._closed = False
        # Messages handed to Watch streams so far (metrics read it).
        self.messages_sent = 0
        # Encoded messages of one revision, by content; see _shared.
        self._shared_revision = 0
        self._shared_messages: dict[Hashable, bytes] = {}
        self._shared_size = 0
        state.subscribe(self._on_changes, on_reset=self._on_reset)

    async def load_history(self) -> None:
        """Take over the change log stored before this start (in the background: a
        long log must not delay serving). Without it, resumes get snapshots.

        Its plugin states share the view's objects where they are equal (as a log
        the registry made itself does), not a second copy of the catalogue."""
        try:
            stored = await self._state.store.load_history(
                known=lambda plugin_id: self._state.view.get(plugin_id)
            )
        except Exception as exc:
            log.warning("change log not loaded; resuming watchers get snapshots: %s", exc)
            stored = []
        # Only what the view already holds: a replica's pump may not have applied the
        # newest stored revisions yet, and will hand them over itself.
        first_live = self._log[0].revision if self._log else self._state.view.revision + 1
        older = [c for c in stored if c.revision < first_live]
        self._log = deque([*older, *self._log], maxlen=self._log.maxlen)
        self._history_loaded.set()
        # Start-up's loading is done: what it built lives long (registry.heap).
        heap.settle(len(self._state.view) + sum(len(c.upserted) for c in older))

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
    ) -> AsyncIterator[bytes]:
        """The messages of one Watch call, encoded, until the hub closes or the caller stops.

        Each is the bytes of a ``WatchResponse``, often the very object other streams
        get. Only plugins that declare one of ``sources`` (any, when empty) and match
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
                yield self._progress(watcher.revision)
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
                    # A timeout, not wait_for: no task of its own for each wait.
                    async with asyncio.timeout(self._progress_interval):
                        await watcher.wake.wait()
                    continue
                self.messages_sent += 1
                yield self._progress(max(watcher.revision, self._state.view.revision))
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

    def _next(self, watcher: Watcher) -> bytes | None:
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
                watcher.sending = self._snapshot_of(snapshot, watcher)
                continue
            if watcher.backlog:
                watcher.sending = self._changes_of(watcher)
                if watcher.sending is not None:
                    continue
            return None

    def _snapshot_of(self, snapshot: ViewSnapshot, watcher: Watcher) -> Iterator[bytes]:
        """The snapshot's messages for this watcher; one shared by watchers alike."""
        key = watcher.filters
        shared = snapshot.messages.get(key)
        if shared is not None:
            return iter((shared,))
        matching = (p for p in snapshot.plugins if watcher.matches(p))
        # The generator holds the snapshot: it stays shared while some stream sends it.
        return self._messages_of(
            snapshot.revision, matching, [], snapshot=True, share=partial(snapshot.share, key)
        )

    def _changes_of(self, watcher: Watcher) -> Iterator[bytes] | None:
        """The watcher's next revision to send from its backlog, as messages.

        The backlog's first change that concerns the watcher; or, past
        ``coalesce_after`` changes (a watcher far behind), all of them as one revision
        at the newest: the latest state of each plugin they upserted, and the ones
        they removed (one upserted and removed within them too: harmless to a client).
        The messages are shared with every watcher for which they come out the same.
        None when nothing in the backlog concerns it.
        """
        backlog = watcher.backlog
        if len(backlog) > self._coalesce_after:
            changes = [c for c in backlog if c.revision > watcher.revision]
            backlog.clear()
            if not changes:
                return None
            watcher.revision = changes[-1].revision
            upserted, removed = _coalesced(changes, watcher)
        else:
            while True:
                if not backlog:
                    return None
                change = backlog.popleft()
                if change.revision <= watcher.revision:
                    continue
                watcher.revision = change.revision
                upserted = [p for p in change.upserted if watcher.matches(p)]
                removed = [p.plugin_id for p in change.removed if watcher.matches(p)]
                if upserted or removed:
                    break
        if not upserted and not removed:
            return None
        revision = watcher.revision
        key = (tuple(p.plugin_id for p in upserted), tuple(removed))
        shared = self._shared(revision, key)
        if shared is not None:
            return iter((shared,))
        return self._messages_of(
            revision, upserted, removed, share=partial(self._share, revision, key)
        )

    def _progress(self, revision: int) -> bytes:
        """A progress message (the revision, no changes), shared at the current revision."""
        message = self._shared(revision, _PROGRESS)
        if message is None:
            message = convert.watch_message(revision, [], [])
            self._share(revision, _PROGRESS, message)
        return message

    def _shared(self, revision: int, key: Hashable) -> bytes | None:
        """The shared message of ``revision`` with this content, if one was built.

        Only the newest revision asked for is kept: asking for a newer one drops the
        older one's messages, and an older one's (a lagging watcher's) are its own.
        """
        if revision > self._shared_revision:
            self._shared_revision = revision
            self._shared_messages.clear()
            self._shared_size = 0
        if revision < self._shared_revision:
            return None
        return self._shared_messages.get(key)

    def _share(self, revision: int, key: Hashable, message: bytes) -> None:
        """Keep a revision's whole message for the next watchers alike (bounded)."""
        if (
            revision == self._shared_revision
            and len(self._shared_messages) < SHARED_MESSAGES
            and self._shared_size + len(message) <= SHARED_BYTES
        ):
            self._shared_messages[key] = message
            self._shared_size += len(message)

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
        share: Callable[[bytes], None] | None = None,
    ) -> Iterator[bytes]:
        """One revision as encoded messages of at most ~MESSAGE_BUDGET bytes, built lazily.

        Large snapshots or changes would exceed a client's receive limit (4 MiB by
        default) in one message: they come as several messages of the same revision,
        the first carrying ``snapshot`` and the removals. Each message is built only
        when the previous one was taken; in between, this holds the encoded items of
        the next one at most (the cache's shared bytes). A revision that is one
        message is handed to ``share`` (for the next watchers it is the same for).
        """
        items: list[bytes] = []
        size = sum(len(plugin_id) + 2 for plugin_id in removed)
        first = True
        for plugin in plugins:
            item = self._encoded(plugin, exact=not snapshot)
            if items and size + len(item) > MESSAGE_BUDGET:
                batch, items, size = items, [], 0
                yield convert.watch_message(
                    revision, batch, removed if first else [], snapshot=snapshot and first
                )
                first = False
            items.append(item)
            size += len(item)
        if items or first:
            message = convert.watch_message(
                revision, items, removed if first else [], snapshot=snapshot and first
            )
            if first and share is not None:
                share(message)
            yield message

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
        self._shared_messages.clear()  # a revision may come again with other contents
        self._shared_size = 0
        self._shared_revision = 0
        for watcher in self._watchers:
            watcher.needs_snapshot = True
            watcher.wake.set()


def _coalesced(changes: Sequence[Change], watcher: Watcher) -> tuple[list[Plugin], list[str]]:
    """Several changes as one: the latest state of each plugin concerning ``watcher``.

    In the order plugins first appear; an id removed in them is only removed (ids are
    never reused, so a plugin removed never comes back).
    """
    latest: dict[str, Plugin | None] = {}
    for change in changes:
        for plugin in change.removed:
            if watcher.matches(plugin):
                latest[plugin.plugin_id] = None
        for plugin in change.upserted:
            if watcher.matches(plugin) and latest.get(plugin.plugin_id, plugin) is not None:
                latest[plugin.plugin_id] = plugin
    upserted = [p for p in latest.values() if p is not None]
    removed = [plugin_id for plugin_id, p in latest.items() if p is None]
    return upserted, removed
