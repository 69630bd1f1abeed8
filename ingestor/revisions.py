"""Whole revisions out of a Watch stream, whose large revisions come in several messages.

    assembler = RevisionAssembler()
    for message in stream:
        for revision in assembler.feed(message):
            apply(revision)         # a whole revision: every part of it arrived

The registry sends a revision too large for one message (a big snapshot, a big batch
of changes) as several messages of that revision, one after the other; only the first
carries ``snapshot`` and the removals. Nothing marks the last one, so a revision is
known to be whole when either

- the next message is not part of it (another revision, a new snapshot, or a progress
  message: no changes), or
- its last message left room for another plugin: the registry starts a new message
  only when the next plugin would take the current one past ``SPLIT_BUDGET`` bytes,
  and no plugin is larger than ``max_plugin_bytes`` (the registry's
  ``--max-bytes-per-plugin``). Nearly every revision is one such message, whole at once.

A revision whose last message was full therefore waits for the next message, at the
latest the registry's next progress message (5 s by default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from registry.wire import pb

log = logging.getLogger(__name__)

# registry.watch.MESSAGE_BUDGET: the registry starts a new message of a revision when
# the plugins in the current one would pass it (counting each plugin's encoded field).
SPLIT_BUDGET = 1024 * 1024
DEFAULT_MAX_PLUGIN_BYTES = 64 * 1024
# A plugin's field costs its encoded size plus its tag and length (at most 6 bytes);
# the registry has counted up to 8 per plugin.
_FIELD_OVERHEAD = 8


@dataclass(frozen=True, slots=True)
class Revision:
    """One whole revision: a snapshot (replace everything), changes, or progress."""

    revision: int
    snapshot: bool = False
    upserted: tuple[pb.RegisteredPlugin, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def progress(self) -> bool:
        """No changes: the view is confirmed current at ``revision``."""
        return not (self.snapshot or self.upserted or self.removed)


@dataclass(slots=True)
class _Parts:
    revision: int
    snapshot: bool
    upserted: list[pb.RegisteredPlugin] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    messages: int = 0

    def add(self, message: pb.WatchResponse) -> None:
        self.upserted.extend(message.upserted)
        self.removed.extend(message.removed_plugin_ids)
        self.messages += 1

    def whole(self) -> Revision:
        return Revision(self.revision, self.snapshot, tuple(self.upserted), tuple(self.removed))


class RevisionAssembler:
    """Turns Watch messages into whole revisions, holding back a revision until it is.

    One per stream: :meth:`reset` when the stream breaks (a revision half received is
    dropped; resuming from the last whole revision sends it again).

    Raises (constructor):
        ValueError: ``max_plugin_bytes`` is not positive.
    """

    def __init__(self, max_plugin_bytes: int = DEFAULT_MAX_PLUGIN_BYTES) -> None:
        if max_plugin_bytes < 1:
            raise ValueError(f"max_plugin_bytes: {max_plugin_bytes!r} must be positive")
        self.max_plugin_bytes = max_plugin_bytes
        self._parts: _Parts | None = None
        self._last = -1  # the revision last handed out with changes

    @property
    def holding(self) -> bool:
        """Whether part of a revision arrived and the rest is awaited."""
        return self._parts is not None

    def reset(self) -> None:
        """Forget a revision half received (its stream broke)."""
        self._parts = None

    def feed(self, message: pb.WatchResponse) -> list[Revision]:
        """The revisions ``message`` completes, in order (none, one, or two)."""
        whole: list[Revision] = []
        changes = bool(message.upserted or message.removed_plugin_ids)
        parts = self._parts
        if parts is not None:
            if changes and not message.snapshot and message.revision == parts.revision:
                parts.add(message)  # the next part of the revision held back
                if self._last_part(message):
                    whole.append(self._release())
                return whole
            whole.append(self._release())  # the next message is not part of it
        if not (changes or message.snapshot):
            whole.append(Revision(message.revision))
            return whole
        if not message.snapshot and message.revision == self._last:
            # Another part of a revision already handed out as whole: a plugin larger
            # than max_plugin_bytes. Applying it as a change still ends in the right view.
            log.warning(
                "revision %d had another Watch message after it looked whole: the registry "
                "allows plugins larger than max_plugin_bytes=%d; raise it",
                message.revision,
                self.max_plugin_bytes,
            )
        parts = _Parts(message.revision, message.snapshot)
        parts.add(message)
        self._parts = parts
        if self._last_part(message):
            whole.append(self._release())
        return whole

    def _release(self) -> Revision:
        parts, self._parts = self._parts, None
        assert parts is not None
        if parts.messages > 1:
            log.debug("revision %d came in %d messages", parts.revision, parts.messages)
        self._last = parts.revision
        return parts.whole()

    def _last_part(self, message: pb.WatchResponse) -> bool:
        """Whether the registry cannot have split ``message``'s revision after it."""
        if not message.upserted:
            return True  # a part is only ever closed with a plugin in it
        # What the registry counted for this message is at most its size plus the
        # difference of overheads per plugin; the next plugin would have fitted.
        counted = message.ByteSize() + (_FIELD_OVERHEAD - 2) * len(message.upserted)
        return counted + self.max_plugin_bytes + _FIELD_OVERHEAD <= SPLIT_BUDGET
