"""A POLKU ingestor plugin: CSV with a header row in, one event per row.

    python examples/csv_ingestor.py --registry 127.0.0.1:50051

The first row names the columns. Every later row becomes an event whose metadata
is the row (column → value), whose payload is the row as a JSON object, and whose
type is its ``event_type`` column (``"csv.row"`` otherwise). A row with the wrong
number of fields becomes an ``IngestError`` whose offset is the byte where the row
starts; the other rows still become events. The payload must be UTF-8.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence

from registry.sdk import run_plugin
from registry.wire import event_pb, pb


class _Lines:
    """Feeds ``csv.reader`` one line at a time, counting the bytes it has handed out."""

    def __init__(self, text: str, offset: int) -> None:
        self._lines = io.StringIO(text, newline="")
        self.offset = offset

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._lines.readline()
        if not line:
            raise StopIteration
        self.offset += len(line.encode())
        return line


def ingest(request: pb.IngestRequest) -> Iterator[event_pb.Event | pb.IngestError]:
    """One event per row, one IngestError (with its byte offset) per malformed row."""
    data = request.data
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode()
    except UnicodeDecodeError as exc:
        yield pb.IngestError(message="not UTF-8", details=str(exc), offset=start + exc.start)
        return
    lines = _Lines(text, start)
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        yield pb.IngestError(message="no header row", offset=start)
        return
    while True:
        row_start = lines.offset  # csv.reader reads no further than the row it returns
        try:
            row = next(reader, None)
        except csv.Error as exc:
            yield pb.IngestError(message="malformed CSV", details=str(exc), offset=row_start)
            return
        if row is None:
            return
        if not any(row):
            continue
        if len(row) != len(header):
            yield pb.IngestError(
                message=f"row has {len(row)} fields; the header has {len(header)}",
                details=f"line {reader.line_num}",
                offset=row_start,
            )
            continue
        record = dict(zip(header, row, strict=True))
        yield event_pb.Event(
            id=uuid.uuid4().hex,
            timestamp_unix_ns=time.time_ns(),
            source=request.source,
            event_type=record.get("event_type") or "csv.row",
            metadata=record,
            payload=json.dumps(record).encode(),
        )


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
    parser.add_argument("--name", default="csv", help="plugin name")
    parser.add_argument(
        "--source", action="append", help="source served (repeatable; default: csv)"
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
            "description": "CSV with a header: one event per row",
            "sources": args.source or ["csv"],
        },
        ingest=ingest,
        registry=args.registry,
        listen=args.listen,
        advertise=args.advertise,
        lease_ttl_seconds=args.lease_ttl,
    )


if __name__ == "__main__":
    main()
