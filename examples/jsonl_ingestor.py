"""A POLKU ingestor plugin: JSON lines in, one event per line.

    python examples/jsonl_ingestor.py --registry 127.0.0.1:50051

Each non-blank line must hold one JSON object. It becomes an event whose payload is
the line as sent, whose id is the object's ``"id"`` (a fresh UUID when it has none),
whose type is its ``"event_type"`` or ``"type"`` (``"jsonl"`` otherwise) and whose
severity comes from its ``"severity"`` or ``"level"``. A line that is not a JSON
object becomes an ``IngestError`` whose offset is the byte where that line starts;
the other lines still become events.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from registry.sdk import run_plugin
from registry.wire import event_pb, pb

SEVERITIES = {
    "debug": event_pb.SEVERITY_DEBUG,
    "info": event_pb.SEVERITY_INFO,
    "warn": event_pb.SEVERITY_WARNING,
    "warning": event_pb.SEVERITY_WARNING,
    "error": event_pb.SEVERITY_ERROR,
    "critical": event_pb.SEVERITY_CRITICAL,
    "fatal": event_pb.SEVERITY_CRITICAL,
}


def _text(record: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def to_event(
    request: pb.IngestRequest, record: dict[str, Any], line: bytes, number: int
) -> event_pb.Event:
    """The event for one parsed line."""
    metadata = {"line": str(number)}
    if request.cluster:
        metadata["cluster"] = request.cluster
    return event_pb.Event(
        id=_text(record, "id") or uuid.uuid4().hex,
        timestamp_unix_ns=time.time_ns(),
        source=request.source,
        event_type=_text(record, "event_type", "type") or "jsonl",
        metadata=metadata,
        payload=line,
        severity=SEVERITIES.get(
            _text(record, "severity", "level").lower(), event_pb.SEVERITY_UNSPECIFIED
        ),
    )


def ingest(request: pb.IngestRequest) -> Iterator[event_pb.Event | pb.IngestError]:
    """One event per valid line, one IngestError (with its byte offset) per bad one."""
    offset = 0
    for number, raw in enumerate(request.data.splitlines(keepends=True), start=1):
        start, offset = offset, offset + len(raw)
        line = raw.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
            yield pb.IngestError(
                message="not valid JSON", details=f"line {number}: {exc}", offset=start
            )
            continue
        if not isinstance(record, dict):
            kind = type(record).__name__
            yield pb.IngestError(
                message="not a JSON object", details=f"line {number}: a JSON {kind}", offset=start
            )
            continue
        yield to_event(request, record, line, number)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--registry", help="registry address (default: $POLKU_REGISTRY or 127.0.0.1:50051)"
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="address to serve on (port 0: any free)"
    )
    parser.add_argument(
        "--advertise", help="address the registry and gateway dial (default: the bound one)"
    )
    parser.add_argument("--name", default="jsonl", help="plugin name")
    parser.add_argument(
        "--source", action="append", help="source served (repeatable; default: jsonl)"
    )
    parser.add_argument(
        "--lease-ttl", type=int, default=0, help="lease in seconds (0: the registry's)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_plugin(
        {
            "name": args.name,
            "version": "1.0.0",
            "description": "JSON lines: one event per line",
            "sources": args.source or ["jsonl"],
        },
        ingest=ingest,
        registry=args.registry,
        listen=args.listen,
        advertise=args.advertise,
        lease_ttl_seconds=args.lease_ttl,
    )


if __name__ == "__main__":
    main()
