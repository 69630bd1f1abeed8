"""Whole revisions out of a Watch stream, as :class:`Revision` values a view applies.

    assembler = RevisionAssembler()
    for message in stream:
        for revision in assembler.feed(message):
            apply(revision)         # a whole revision: every part of it arrived

When a revision is whole is the registry package's rule
(:class:`registry.revisions.WholeRevisions`, whose docstring explains it): the
registry's CLI prints with the same rule. This module merges a revision's messages
into one :class:`Revision` and warns when the registry broke the rule's assumption.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from registry.revisions import DEFAULT_MAX_PLUGIN_BYTES, SPLIT_BUDGET, WholeRevisions
from registry.wire import pb

__all__ = ["DEFAULT_MAX_PLUGIN_BYTES", "SPLIT_BUDGET", "Revision", "RevisionAssembler"]

log = logging.getLogger(__name__)


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


class RevisionAssembler:
    """Turns Watch messages into whole revisions, holding back a revision until it is.

    One per stream: :meth:`reset` when the stream breaks (a revision half received is
    dropped; resuming from the last whole revision sends it again).

    Raises (constructor):
        ValueError: ``max_plugin_bytes`` is not positive.
    """

    def __init__(self, max_plugin_bytes: int = DEFAULT_MAX_PLUGIN_BYTES) -> None:
        self._whole = WholeRevisions(max_plugin_bytes)
        self._last = -1  # the revision last handed out with changes

    @property
    def max_plugin_bytes(self) -> int:
        """The largest plugin the registry is taken to allow (``--max-bytes-per-plugin``)."""
        return self._whole.max_plugin_bytes

    @property
    def holding(self) -> bool:
        """Whether part of a revision arrived and the rest is awaited."""
        return self._whole.holding

    def reset(self) -> None:
        """Forget a revision half received (its stream broke)."""
        self._whole.reset()

    def feed(self, message: pb.WatchResponse) -> list[Revision]:
        """The revisions ``message`` completes, in order (none, one, or two)."""
        changes = bool(message.upserted or message.removed_plugin_ids)
        # Not a part of a revision held back, but of one already handed out as whole: the
        # registry has a plugin larger than max_plugin_bytes. Applying it as a change still
        # ends in the right view.
        late = changes and not message.snapshot and message.revision == self._last
        if late and not self._whole.holding:
            log.warning(
                "revision %d had another Watch message after it looked whole: the registry "
                "allows plugins larger than max_plugin_bytes=%d; raise it",
                message.revision,
                self.max_plugin_bytes,
            )
        return [self._revision(messages) for messages in self._whole.feed(message)]

    def _revision(self, messages: Sequence[pb.WatchResponse]) -> Revision:
        first = messages[0]
        upserted = [plugin for message in messages for plugin in message.upserted]
        removed = [plugin_id for message in messages for plugin_id in message.removed_plugin_ids]
        revision = Revision(first.revision, first.snapshot, tuple(upserted), tuple(removed))
        if revision.progress:
            return revision
        if len(messages) > 1:
            log.debug("revision %d came in %d messages", first.revision, len(messages))
        self._last = first.revision
        return revision
