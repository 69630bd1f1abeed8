"""``IngestResult``: a plugin's events together with the per-record errors it reported.

result = await hub.ingest_with_errors_async(IngestContext("k8s"), raw)
for error in result.errors:          # pb.IngestError: message, details, offset
    quarantine(raw, error.offset, error.message)
forward(result.events)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.wire import event_pb, pb


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one Ingest produced: ``events`` in order, and ``errors`` as the plugin sent them.

    ``errors`` are the plugin's ``IngestError`` records (``message``, ``details``, the
    byte ``offset`` of the bad record), in the order it returned them; empty when every
    record parsed. A result never has errors without events: that answer is a
    PluginTransformError instead (its ``errors`` hold them).
    """

    events: list[event_pb.Event] = field(default_factory=list)
    errors: list[pb.IngestError] = field(default_factory=list)
