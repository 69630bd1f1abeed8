"""Whole revisions out of a Watch stream, whose large revisions come in several messages.

    revisions = WholeRevisions()
    for message in stream:
        for messages in revisions.feed(message):
            show(messages)          # a whole revision: every part of it arrived

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
latest the registry's next progress message (5 s by default). The CLI's ``watch``
prints with this rule; the gateway's ``ingestor.revisions.RevisionAssembler`` applies
with it.
"""

from __future__ import annotations

from registry.wire import pb

# registry.watch.MESSAGE_BUDGET: the registry starts a new message of a revision when
# the plugins in the current one would pass it (counting each plugin's encoded field).
SPLIT_BUDGET = 1024 * 1024
DEFAULT_MAX_PLUGIN_BYTES = 64 * 1024
# A plugin's field costs its encoded size plus its tag and length (at most 6 bytes);
# the registry has counted up to 8 per plugin.
_FIELD_OVERHEAD = 8


class WholeRevisions:
    """Holds a Watch stream's messages back until the revision they belong to is whole.

    One per stream: :meth:`reset` when the stream breaks (a revision half received is
    dropped; resuming from the last whole revision sends it again).

    Raises (constructor):
        ValueError: ``max_plugin_bytes`` is not positive.
    """

    def __init__(self, max_plugin_bytes: int = DEFAULT_MAX_PLUGIN_BYTES) -> None:
        if max_plugin_bytes < 1:
            raise ValueError(f"max_plugin_bytes: {max_plugin_bytes!r} must be positive")
        self.max_plugin_bytes = max_plugin_bytes
        self._held: list[pb.WatchResponse] = []

    @property
    def holding(self) -> bool:
        """Whether part of a revision arrived and the rest is awaited."""
        return bool(self._held)

    def reset(self) -> None:
        """Drop a revision half received: its stream broke, a resume sends it again."""
        self._held = []

    def feed(self, message: pb.WatchResponse) -> list[list[pb.WatchResponse]]:
        """The revisions ``message`` completes (none, one or two), each as its messages.

        A progress message (no changes) is a revision of its own, as one message.
        """
        whole: list[list[pb.WatchResponse]] = []
        held = self._held
        if held:
            changes = bool(message.upserted or message.removed_plugin_ids)
            if changes and not message.snapshot and message.revision == held[0].revision:
                held.append(message)  # the next part of the revision held back
                if self._last_part(message):
                    whole.append(held)
                    self._held = []
                return whole
            whole.append(held)  # the next message is not part of it
            self._held = []
        if self._last_part(message):
            whole.append([message])
        else:
            self._held = [message]
        return whole

    def _last_part(self, message: pb.WatchResponse) -> bool:
        """Whether the registry cannot have split ``message``'s revision after it."""
        if not message.upserted:
            return True  # a part is only ever closed with a plugin in it
        # What the registry counted for this message is at most its size plus the
        # difference of overheads per plugin; the next plugin would have fitted.
        counted = message.ByteSize() + (_FIELD_OVERHEAD - 2) * len(message.upserted)
        return counted + self.max_plugin_bytes + _FIELD_OVERHEAD <= SPLIT_BUDGET
