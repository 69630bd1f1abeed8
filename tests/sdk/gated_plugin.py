"""A plugin whose ingest of ``b"slow"`` holds until the test says so, for shutdown tests.

    python tests/sdk/gated_plugin.py --registry ADDR --name N

An Ingest of ``slow`` prints ``ingest started`` and then waits for a line on stdin
before it answers, so a test can send SIGTERM while the call is surely in flight.
Any other payload gets one event per line at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from registry.sdk import run_plugin
from registry.testing import echo_lines
from registry.wire import pb


def ingest(request: pb.IngestRequest) -> pb.IngestResponse:
    if request.data == b"slow":
        print("ingest started", flush=True)
        sys.stdin.readline()  # blocks this pool thread only; the loop keeps serving
    return echo_lines(request)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", default="gated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_plugin(
        {"name": args.name, "sources": [args.name]},
        ingest=ingest,
        registry=args.registry,
        lease_ttl_seconds=3,
        grace=60.0,
    )


if __name__ == "__main__":
    main()
