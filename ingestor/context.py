"""The routing data of one ingest call."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IngestContext:
    """Where a raw payload comes from: routes it (``source``) and travels with it.

    ``source`` picks the plugin; ``cluster`` and ``format`` are passed to it as
    ``IngestRequest.cluster`` and ``IngestRequest.format``.
    """

    source: str
    cluster: str = ""
    format: str = ""
